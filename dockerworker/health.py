"""Health: the HTTP endpoint (WORKER_HEALTH_PORT, default 8080) and the ready report.

Owns: `/healthz` (200 while the process serves at all: liveness) and
`/readyz` (200 once the code is loaded and a consumer is attached to the
queue, 503 otherwise), served by `minihttp` on a daemon thread so it answers
even while user code is busy; and the ready report: a `POST` to
WORKER_READY_URL each time the worker becomes ready (the first attach, and
every re-attach after a reconnect), so that the controller learns at once,
without polling, that a new container consumes its queue, repeated a few
times during the first minute (see `ReportPolicy`).

Also here: the ready file (`/tmp/dockerworker.ready`), present while the
worker is ready and kept fresh by the event loop, which is what the image's
HEALTHCHECK tests: a `find` of its age, with no Python process started and
no HTTP request made (docs/benchmarks.md, "A worker at rest").

At rest nothing here wakes up: the server thread sleeps in `accept` until a
request comes, the reporter's thread on its event until the worker becomes
ready (and for its few repeats after that).

Must not do: block the runtime. `Readiness.set` only flips flags, writes or
removes the ready file, and wakes the reporter's own thread; the HTTP call
happens there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

import orjson

from . import logs, minihttp


class Readiness:
    """What readiness is made of; written by the runtime, read by the server thread.

    Listeners added with `on_ready` are called, on the thread that made the
    change, each time readiness goes from false to true; those added with
    `on_change` each time it changes either way, with the new value. They
    must return at once.
    """

    def __init__(self, code_loaded: bool = False, consumer_attached: bool = False) -> None:
        self.code_loaded = code_loaded
        self.consumer_attached = consumer_attached
        self._lock = threading.Lock()
        self._listeners: list[Callable[[bool], None]] = []

    def __repr__(self) -> str:
        return f"Readiness(code_loaded={self.code_loaded}, consumer_attached={self.consumer_attached})"

    def set(self, *, code_loaded: bool | None = None, consumer_attached: bool | None = None) -> None:
        with self._lock:
            was_ready = self.code_loaded and self.consumer_attached
            if code_loaded is not None:
                self.code_loaded = code_loaded
            if consumer_attached is not None:
                self.consumer_attached = consumer_attached
            now_ready = self.code_loaded and self.consumer_attached
            listeners = list(self._listeners) if now_ready != was_ready else []
        for listener in listeners:
            listener(now_ready)

    def on_ready(self, listener: Callable[[], None]) -> None:
        self.on_change(lambda ready: listener() if ready else None)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def snapshot(self) -> dict[str, bool]:
        with self._lock:
            return {"code_loaded": self.code_loaded, "consumer_attached": self.consumer_attached}

    @property
    def ready(self) -> bool:
        return all(self.snapshot().values())


def runtime_file(name: str) -> str:
    """A file of the runtime's in the temporary directory (TMPDIR, else /tmp,
    as `tempfile.gettempdir()` finds it in the container; that module is not
    imported for this alone, it costs a start several more modules)."""
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", name)


# The image's HEALTHCHECK tests this path, hard-coded there.
READY_FILE = runtime_file("dockerworker.ready")
# How often the event loop touches the ready file, and the age at which the
# HEALTHCHECK calls it stale (the Dockerfile says 90 seconds).
READY_FILE_REFRESH_S = 30.0


class ReadyFile:
    """A file that exists while the worker is ready, kept fresh by the event loop.

    Written and removed on the thread that changes the readiness; `refresh`
    (the event loop, every READY_FILE_REFRESH_S) sets its modification time,
    so a loop that stops turning leaves a stale file, and the HEALTHCHECK,
    which tests the age, reports the container unhealthy. Failing to write
    it costs the health status only, never the worker: logged once.
    """

    def __init__(self, path: str = READY_FILE) -> None:
        self.path = path
        self._warned = False

    def attach(self, readiness: Readiness) -> "ReadyFile":
        readiness.on_change(self._follow)
        self._follow(readiness.ready)
        return self

    def refresh(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass  # not ready: nothing to keep fresh
        except OSError as exc:
            self._warn(exc)

    def _follow(self, ready: bool) -> None:
        try:
            if ready:
                with open(self.path, "wb"):
                    pass
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            logs.event("ready_file_failed", level=logging.WARNING, path=self.path, error=str(exc))


class HealthServer:
    """A started health endpoint; `port` is the one really bound (useful with port 0).

    Served by `minihttp.Server` on a thread of its own, which waits in
    `accept` for as long as nobody asks (the stdlib's `serve_forever` wakes
    twice a second to look for a shutdown request).
    """

    def __init__(self, readiness: Readiness, port: int, host: str = "0.0.0.0") -> None:
        self.readiness = readiness
        self._server = minihttp.Server(host, port, self._answer)

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> "HealthServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def _answer(self, path: str) -> tuple[int, bytes]:
        if path == "/healthz":
            return 200, orjson.dumps({"status": "ok"})
        if path == "/readyz":
            state = self.readiness.snapshot()
            ready = all(state.values())
            return (200 if ready else 503), orjson.dumps({"status": "ready" if ready else "not ready", **state})
        return 404, orjson.dumps({"status": "not found"})


# A POST to the ready URL with a timeout: the answer's status; raises OSError
# when there is no answer.
Post = Callable[[str, float], int]


class ReportPolicy(NamedTuple):
    attempts: int = 5
    first_delay_s: float = 0.05
    timeout_s: float = 2.0
    # After a report: the same report again every `repeat_every_s`, `repeats`
    # times (the first minute), while the worker stays ready. Ready reports
    # live in the memory of the daemon that received them; a daemon that
    # restarts or takes over in that minute, while the rollout that started
    # this container waits for it, hears it again well within its
    # `reconcile.ready_timeout` (30 s). Later the image's HEALTHCHECK (every
    # few minutes, see the Dockerfile) and the status the daemon wrote say it.
    repeat_every_s: float = 5.0
    repeats: int = 12


class ReadyReporter:
    """Sends `POST <url>` (empty body) each time `readiness` becomes ready.

    One thread for the life of the process, woken by `Readiness`; nothing
    happens per message. Connection errors, timeouts and 5xx answers are
    retried with a doubling delay, then given up on with one log line; a 4xx
    answer is not retried. A report still being retried when the worker stops
    being ready is dropped (logged as `ready_report_dropped`): the next attach
    sends a fresh one. Then the report is repeated (`ReportPolicy.repeats`,
    one attempt each, logged only at debug level) while the worker stays
    ready; after that the thread sleeps until the next attach. The URL's
    query (it carries the controller's token) never appears in a log line.
    """

    def __init__(self, url: str, readiness: Readiness, policy: ReportPolicy = ReportPolicy(), post: Post | None = None) -> None:
        self.url = url
        self.readiness = readiness
        self.policy = policy
        self._post = post or _post
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-report", daemon=True)

    def start(self) -> "ReadyReporter":
        self._thread.start()
        self.readiness.on_ready(self._wanted.set)
        if self.readiness.ready:  # became ready before we listened
            self._wanted.set()
        return self

    def close(self) -> None:
        self._closed.set()
        self._wanted.set()
        self._thread.join(timeout=self.policy.timeout_s + 1.0)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed.is_set():
                return
            if self._report():
                self._repeat()

    def _repeat(self) -> None:
        """The same report again, a few times, until the worker is no longer
        ready or becomes ready anew (which starts a fresh report)."""
        for _ in range(self.policy.repeats):
            if self._wanted.wait(self.policy.repeat_every_s) or not self.readiness.ready:
                return
            outcome = self._attempt()
            if outcome is not None:
                logs.event("ready_report_repeat_failed", level=logging.DEBUG, url=_shown(self.url), error=outcome)

    def _report(self) -> bool:
        """Whether the report was accepted."""
        delay = self.policy.first_delay_s
        started = time.monotonic()
        for attempt in range(1, self.policy.attempts + 1):
            if self._closed.is_set():
                return False
            if not self.readiness.ready:
                # No longer true; the next attach reports again.
                logs.event("ready_report_dropped", attempt=attempt)
                return False
            outcome = self._attempt()
            if outcome is None:
                logs.event("ready_reported", attempt=attempt, ms=round((time.monotonic() - started) * 1000, 1))
                return True
            if outcome.startswith("refused"):
                logs.event("ready_report_refused", level=logging.WARNING, url=_shown(self.url), error=outcome)
                return False
            if attempt < self.policy.attempts and self._closed.wait(delay):
                return False
            delay *= 2
        logs.event(
            "ready_report_failed", level=logging.WARNING, url=_shown(self.url), attempts=self.policy.attempts, error=outcome
        )
        return True  # the repeats may yet reach it (a daemon restarting, say)

    def _attempt(self) -> str | None:
        """None on success, else why not: 'refused: ...' (4xx, final) or a reason worth a retry."""
        try:
            status = self._post(self.url, self.policy.timeout_s)
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None
        if 400 <= status < 500:
            return f"refused: answered {status}"
        return f"answered {status}"


def _post(url: str, timeout_s: float) -> int:
    return minihttp.request("POST", url, timeout_s).status


def _shown(url: str) -> str:
    """The URL without its query and credentials, fit for a log line."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
