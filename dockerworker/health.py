"""The health HTTP endpoint (WORKER_HEALTH_PORT, default 8080).

Owns: `/healthz` (200 while the process serves at all: liveness) and
`/readyz` (200 once the code is loaded and a consumer is attached to the
queue, 503 otherwise), served by the stdlib on a daemon thread so it answers
even while user code is busy.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Readiness:
    """What readiness is made of; written by the runtime, read by the server thread."""

    code_loaded: bool = False
    consumer_attached: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, *, code_loaded: bool | None = None, consumer_attached: bool | None = None) -> None:
        with self._lock:
            if code_loaded is not None:
                self.code_loaded = code_loaded
            if consumer_attached is not None:
                self.consumer_attached = consumer_attached

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
