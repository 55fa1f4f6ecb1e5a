"""Structured logging and the capture of what user code prints.

Owns: the one JSON-object-per-line format of everything the runtime writes to
stdout, the log levels (named here, chosen by WORKER_LOG_LEVEL), and the
redirection of `print` (stdout and stderr) inside user code into a buffer
attributed to the message being processed.

Capture is per thread: user code runs on its own thread, and only writes made
on a thread that has an open capture are diverted, so the runtime's own log
lines (written to the real stream) are never swallowed.

Must not do: decide what is logged per message (that is `pump`); this
module only formats, filters by level and writes.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from typing import Any, TextIO

import orjson

# The levels, by name; `event(..., level=WARNING)`.
DEBUG = logging.DEBUG
INFO = logging.INFO
WARNING = logging.WARNING
ERROR = logging.ERROR
_LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}

# What one message's captured output may add to its log line; the rest is cut
# so a chatty `process` cannot turn each log line into megabytes.
MAX_CAPTURED_CHARS = 4096

_local = threading.local()
_write_lock = threading.Lock()
_real_stdout: TextIO = sys.stdout
# Checked on every event: a plain int, not the logging module's lookup.
_threshold = INFO


class Captured:
    """What one thread printed while a `capture()` was open; nothing is
    allocated until something is printed (most `process` calls print nothing)."""

    __slots__ = ("_parts", "_previous")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._previous: Captured | None = None

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def getvalue(self) -> str:
        return "".join(self._parts)

    def __enter__(self) -> "Captured":
        _install_routers()
        self._previous = getattr(_local, "capture", None)
        _local.capture = self
        return self

    def __exit__(self, *_: object) -> None:
        _local.capture = self._previous


def capture() -> Captured:
    """Collect everything printed on this thread while the `with` block runs."""
    return Captured()


class _CaptureRouter(io.TextIOBase):
    """A stand-in for sys.stdout/sys.stderr that diverts writes made under `capture()`."""

    def __init__(self, real: TextIO) -> None:
        self._real = real

    def write(self, text: str) -> int:
        captured: Captured | None = getattr(_local, "capture", None)
        if captured is not None:
            return captured.write(text)
        return self._real.write(text)

    def flush(self) -> None:
        if getattr(_local, "capture", None) is None:
            self._real.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._real, "encoding", "utf-8")


def setup(level: int = INFO, stream: TextIO | None = None) -> None:
    """Route stdlib logging to JSON lines on stdout, install the print capture,
    and drop events below `level`."""
    global _real_stdout, _threshold
    _real_stdout = stream or sys.__stdout__ or sys.stdout
    _threshold = level
    _install_routers()
    handler = logging.StreamHandler(_LineWriter())
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _install_routers() -> None:
    if not isinstance(sys.stdout, _CaptureRouter):
        sys.stdout = _CaptureRouter(sys.stdout)
    if not isinstance(sys.stderr, _CaptureRouter):
        sys.stderr = _CaptureRouter(sys.stderr)


def clip(text: str, limit: int = MAX_CAPTURED_CHARS) -> str:
    """Shorten captured output to `limit` characters, saying that it was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters cut]"


def enabled(level: int) -> bool:
    """Whether an event at `level` would be written: check before building
    the fields of a per-message line."""
    return level >= _threshold


def event(name: str, level: int = INFO, **fields: Any) -> None:
    """Write one structured log line: `event` plus the given fields.

    Written directly rather than through `logging`: this may run once per
    message, and a LogRecord plus handler chain costs several times the
    JSON encoding itself.
    """
    if level < _threshold:
        return
    line = {"ts": _iso_ms(time.time()), "level": _LEVEL_NAMES.get(level, str(level)), "event": name}
    line.update(fields)
    _write_line(orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE).decode())


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
        return orjson.dumps(line, default=str).decode()


def _iso_ms(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"
