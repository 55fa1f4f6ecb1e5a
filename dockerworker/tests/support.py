"""Helpers for the dockerworker tests: inputs, HTTP stubs, a broker client, a worker process.

The messaging tests run against a REAL RabbitMQ (AMQP_URL, default the local
`workerctl` user that scripts/services creates); they fail, never skip, when
it is not reachable. Every test uses its own random exchange and worker id,
so tests cannot see each other's messages.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pika
import pika.exceptions

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `dockerworker/`
AMQP_URL = os.environ.get("AMQP_URL", "amqp://workerctl:workerctl@127.0.0.1:5672/%2f")
TRIVIAL_CODE = "def process(msg):\n    return msg\n"
FLASK_MAIN = "import flask\nimport usercode\n\ndef main():\n    return usercode.process(flask.request)\n"


# -- building inputs -------------------------------------------------------------


def zip_bytes(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def sensorbucket_zip(usercode: str) -> bytes:
    """An archive laid out like the one the existing API builds."""
    return zip_bytes(
        {
            "usercode.py": usercode,
            "main.py": FLASK_MAIN,
            "requirements.txt": "python-dateutil==2.8.2\n",
            "build.sh": "#!/bin/sh\npip3 install -r requirements.txt -t .\n",
        }
    )


def pipeline_message(**overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "tracing_id": str(uuid.uuid4()),
        "tenant_id": 1,
        "access_token": "token",
        "received_at": 1694435883523,
        "pipeline_id": str(uuid.uuid4()),
        "step_index": 0,
        "pipeline_steps": ["this-worker", "next"],
        "timestamp": 1694435883523,
        "device": None,
        "measurements": [],
        "payload": base64.b64encode(b"hello").decode(),
        "metadata": {},
    }
    message.update(overrides)
    return message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- a scripted HTTP server (code endpoint, devices endpoint) ----------------------


@dataclass
class Scripted:
    """Answers requests from a script: each entry is (status, json body); the last one repeats."""

    answers: list[tuple[int, Any]]
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def next_answer(self) -> tuple[int, Any]:
        index = min(len(self.requests) - 1, len(self.answers) - 1)
        return self.answers[index]


class HttpStub:
    def __init__(self, script: Scripted) -> None:
        self.script = script
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                stub.script.requests.append((self.path, dict(self.headers)))
                status, body = stub.script.next_answer()
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def code_answer(archive: bytes) -> tuple[int, Any]:
    return 200, {"data": base64.b64encode(archive).decode(), "message": "source code"}


# -- the broker, through a synchronous facade ----------------------------------------


@dataclass(frozen=True)
class Received:
    """A message taken from a queue."""

    body: bytes
    message_id: str | None
    headers: dict[str, Any]


class Broker:
    """A test-side AMQP client (pika, blocking): declare sinks, publish, collect."""

    def __init__(self, url: str) -> None:
        self.exchange_name = f"test.{uuid.uuid4()}"
        self._queues: list[str] = []
        parameters = pika.URLParameters(url)
        parameters.heartbeat = 0  # a test may sit in a wait without calling in
        parameters.connection_attempts = 1
        parameters.socket_timeout = 5
        self._connection = pika.BlockingConnection(parameters)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        self._bulk = self._connection.channel()  # no confirms: for publishing many at once
        self._channel.exchange_declare(self.exchange_name, exchange_type="topic", durable=True)

    def sink(self, routing_key: str, arguments: dict[str, Any] | None = None) -> str:
        """A queue bound to `routing_key` on the test exchange; returns its name."""
        name = f"test.sink.{routing_key}.{uuid.uuid4()}"
        self._channel.queue_declare(name, durable=True, arguments=arguments)
        self._channel.queue_bind(name, self.exchange_name, routing_key)
        self._queues.append(name)
        return name

    def publish(self, routing_key: str, body: bytes | dict[str, Any], message_id: str | None = None, **props: Any) -> None:
        """Publish one message and wait for the broker's confirm."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self._channel.basic_publish(
            self.exchange_name, routing_key, data, pika.BasicProperties(message_id=message_id, **props)
        )

    def publish_many(self, routing_key: str, bodies: list[tuple[str, bytes]]) -> None:
        for message_id, body in bodies:
            self._bulk.basic_publish(self.exchange_name, routing_key, body, pika.BasicProperties(message_id=message_id))
        # A synchronous call on the same channel returns only after the
        # broker has handled (routed) everything published before it.
        self._bulk.exchange_declare(self.exchange_name, passive=True)

    def take(self, queue: str, count: int, timeout: float = 20.0) -> list[Received]:
        """Wait for `count` messages on `queue` (acked as taken); fail after `timeout`."""
        taken: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(taken) < count and time.monotonic() < deadline:
            message = self._get(queue)
            if message is None:
                time.sleep(0.05)
            else:
                taken.append(message)
        assert len(taken) >= count, f"{queue}: got {len(taken)} of {count} messages in {timeout}s"
        return taken

    def take_ids(self, queue: str, expected: set[str], timeout: float = 60.0) -> list[Received]:
        """Collect from `queue` until every message id in `expected` has arrived (duplicates allowed)."""
        taken: list[Received] = []
        deadline = time.monotonic() + timeout
        while not expected <= {message.message_id for message in taken} and time.monotonic() < deadline:
            message = self._get(queue)
            if message is None:
                time.sleep(0.05)
            else:
                taken.append(message)
        missing = expected - {message.message_id for message in taken}
        assert not missing, f"{queue}: {len(missing)} of {len(expected)} never arrived, e.g. {sorted(missing)[:5]}"
        return taken

    def drain(self, queue: str) -> list[Received]:
        """Everything on `queue` now, without waiting."""
        taken = []
        while (message := self._get(queue)) is not None:
            taken.append(message)
        return taken

    def _get(self, queue: str) -> Received | None:
        method, properties, body = self._channel.basic_get(queue, auto_ack=True)
        if method is None:
            return None
        return Received(body, properties.message_id, dict(properties.headers or {}))

    def declare_queue(self, name: str, **arguments: Any) -> None:
        """Declare a queue as some other program would have (deleted at the end of the test)."""
        self._channel.queue_declare(name, **arguments)
        self._queues.append(name)

    def is_durable_quorum_queue(self, name: str) -> bool:
        """True when declaring `name` as a durable quorum queue matches what exists (the broker
        refuses a declaration whose durability or queue type differs)."""
        channel = self._connection.channel()
        try:
            channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        except pika.exceptions.ChannelClosedByBroker:
            return False
        channel.close()
        return True

    def message_count(self, queue: str) -> int:
        return int(self._channel.queue_declare(queue, passive=True).method.message_count)

    def consumer_count(self, queue: str) -> int:
        return int(self._channel.queue_declare(queue, passive=True).method.consumer_count)

    def declare_worker_queue(self, worker_id: str) -> str:
        """`worker_<id>` as a worker declares it (docs/compatibility.md §4), bound on the test exchange."""
        name = f"worker_{worker_id}"
        self._channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        self._channel.queue_bind(name, self.exchange_name, worker_id)
        self._queues.append(name)
        return name

    def forget(self, queue: str) -> None:
        """Delete `queue` at the end of the test."""
        self._queues.append(queue)

    def close(self) -> None:
        try:
            channel = self._connection.channel()
            for name in self._queues:
                channel.queue_delete(name)
            channel.exchange_delete(self.exchange_name)
        finally:
            self._connection.close()


# -- the worker as a subprocess ----------------------------------------------------------


class Worker:
    """`python -m dockerworker run` with a test environment; its log lines are kept."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.health_port = int(env["WORKER_HEALTH_PORT"])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def worker_id(self) -> str:
        return self.env["WORKER_ID"]

    @property
    def queue(self) -> str:
        return f"worker_{self.worker_id}"

    def start(self) -> "Worker":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dockerworker", "run"],
            env=self.env,
            cwd=PACKAGE_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, timeout: float = 20.0) -> "Worker":
        wait_until(self._ready, timeout, f"worker ready; log:\n{self.log_text()}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}; log:\n{self.log_text()}")
        return http_status(f"http://127.0.0.1:{self.health_port}/readyz") == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the worker and return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"worker did not exit within {timeout}s; log:\n{self.log_text()}") from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"unparsed": line})
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == name]


class TcpProxy:
    """Forwards a local port to the broker; `cut()` drops every open connection, as a broker restart would."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


