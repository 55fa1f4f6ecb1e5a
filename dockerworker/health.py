"""Health: the HTTP endpoint (WORKER_HEALTH_PORT, default 8080) and the ready report.

Owns: `/healthz` (200 while the process serves at all: liveness) and
`/readyz` (200 once the code is loaded and a consumer is attached to the
queue, 503 otherwise), served by the stdlib on a daemon thread so it answers
even while user code is busy; and the ready report: a `POST` to
WORKER_READY_URL each time the worker becomes ready (the first attach, and
every re-attach after a reconnect), so that the controller learns at once,
without polling, that a new container consumes its queue.
Must not do: block the runtime. `Readiness.set` only flips flags and wakes
the reporter's own thread; the HTTP call happens there.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from . import logs


@dataclass
class Readiness:
    """What readiness is made of; written by the runtime, read by the server thread.

    Listeners added with `on_ready` are called, on the thread that made the
    change, each time readiness goes from false to true; they must return at once.
    """

    code_loaded: bool = False
    consumer_attached: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def set(self, *, code_loaded: bool | None = None, consumer_attached: bool | None = None) -> None:
        with self._lock:
            was_ready = self.code_loaded and self.consumer_attached
            if code_loaded is not None:
                self.code_loaded = code_loaded
            if consumer_attached is not None:
                self.consumer_attached = consumer_attached
            became_ready = not was_ready and self.code_loaded and self.consumer_attached
            listeners = list(self._listeners) if became_ready else []
        for listener in listeners:
            listener()

    def on_ready(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def snapshot(self) -> dict[str, bool]:
        with self._lock:
            return {"code_loaded": self.code_loaded, "consumer_attached": self.consumer_attached}

    @property
    def ready(self) -> bool:
        return all(self.snapshot().values())


class HealthServer:
    """A started health endpoint; `port` is the one really bound (useful with port 0)."""

    def __init__(self, readiness: Readiness, port: int, host: str = "0.0.0.0") -> None:
        handler = type("Handler", (_Handler,), {"readiness": readiness})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    readiness: Readiness

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, {"status": "ok"})
        elif path == "/readyz":
            state = self.readiness.snapshot()
            ready = all(state.values())
            self._answer(200 if ready else 503, {"status": "ready" if ready else "not ready", **state})
        else:
            self._answer(404, {"status": "not found"})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Probes every few seconds would drown the per-message log lines.
        return


# A POST to the ready URL with a timeout: the answer's status; raises OSError
# or http.client.HTTPException when there is no answer.
Post = Callable[[str, float], int]


@dataclass(frozen=True)
class ReportPolicy:
    attempts: int = 5
    first_delay_s: float = 0.05
    timeout_s: float = 2.0


class ReadyReporter:
    """Sends `POST <url>` (empty body) each time `readiness` becomes ready.

    One thread for the life of the process, woken by `Readiness`; nothing
    happens per message. Connection errors, timeouts and 5xx answers are
    retried with a doubling delay, then given up on with one log line; a 4xx
    answer is not retried. A report still being retried when the worker stops
    being ready is dropped (logged as `ready_report_dropped`): the next attach
    sends a fresh one. The URL's query
    (it carries the controller's token) never appears in a log line.
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
            self._report()

    def _report(self) -> None:
        delay = self.policy.first_delay_s
        started = time.monotonic()
        for attempt in range(1, self.policy.attempts + 1):
            if self._closed.is_set():
                return
            if not self.readiness.ready:
                # No longer true; the next attach reports again.
                logs.event("ready_report_dropped", attempt=attempt)
                return
            outcome = self._attempt()
            if outcome is None:
                logs.event("ready_reported", attempt=attempt, ms=round((time.monotonic() - started) * 1000, 1))
                return
            if outcome.startswith("refused"):
                logs.event("ready_report_refused", level=logging.WARNING, url=_shown(self.url), error=outcome)
                return
            if attempt < self.policy.attempts and self._closed.wait(delay):
                return
            delay *= 2
        logs.event(
            "ready_report_failed", level=logging.WARNING, url=_shown(self.url), attempts=self.policy.attempts, error=outcome
        )

    def _attempt(self) -> str | None:
        """None on success, else why not: 'refused: ...' (4xx, final) or a reason worth a retry."""
        try:
            status = self._post(self.url, self.policy.timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None
        if 400 <= status < 500:
            return f"refused: answered {status}"
        return f"answered {status}"


def _post(url: str, timeout_s: float) -> int:
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", target, body=b"", headers={"content-length": "0", "connection": "close"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _shown(url: str) -> str:
    """The URL without its query and credentials, fit for a log line."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
