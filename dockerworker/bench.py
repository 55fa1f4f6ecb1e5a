"""Throughput benchmark: N messages through one worker process and a real broker.

Owns: nothing the runtime uses. It starts `python -m dockerworker run` as a
subprocess with a trivial `process` (served over HTTP like the controller
does), publishes N pipeline messages to the worker's routing key and times
their arrival on the next step's queue.

    python -m dockerworker.bench [--messages 10000] [--mode stream|preload]

`stream`: the worker is running and ready; the clock runs from the first
publish to the last arrival (end to end, publisher included).
`preload`: the messages wait in the queue before the worker starts; the
clock runs from the first arrival to the last (the worker's drain rate).
Names are random per run, and everything declared is deleted at the end.
The broker URL comes from AMQP_URL (default: the local test broker).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aio_pika

DEFAULT_AMQP_URL = "amqp://workerctl:workerctl@127.0.0.1:5672/%2f"
TRIVIAL_CODE = "def process(msg):\n    return msg\n"
PUBLISH_WINDOW = 500


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.bench")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--mode", choices=("stream", "preload"), default="stream")
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args()
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    result = asyncio.run(bench(amqp_url, args.messages, args.mode, args.prefetch))
    print(json.dumps(result))
    return 0 if result["arrived"] == args.messages else 1


async def bench(amqp_url: str, count: int, mode: str, prefetch: int) -> dict[str, object]:
    names = _Names()
    connection = await aio_pika.connect(amqp_url)
    code_server = serve_code(zip_code({"usercode.py": TRIVIAL_CODE}))
    worker: subprocess.Popen[bytes] | None = None
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange, sink = await _declare(channel, names, worker_queue=(mode == "preload"))
        arrivals = _Arrivals(count)
        await sink.consume(arrivals.on_message, no_ack=True)
        if mode == "preload":
            await publish_messages(exchange, names.worker_id, count)
        worker = start_worker(amqp_url, names, code_server, prefetch)
        wait_ready(worker, names.health_port)
        cpu_before = process_cpu_s(worker.pid)
        started = time.perf_counter()
        if mode == "stream":
            await publish_messages(exchange, names.worker_id, count)
        published = time.perf_counter()
        await arrivals.wait(timeout=max(60.0, count / 100))
        result = _result(mode, count, arrivals, started, published)
        # CPU time per message does not depend on what else the machine
        # runs; the wall-clock rate above does.
        cpu = process_cpu_s(worker.pid) - cpu_before
        result["worker_cpu_us_per_message"] = round(cpu / max(arrivals.count, 1) * 1e6, 1)
        return result
    finally:
        if worker is not None:
            stop_worker(worker)
        code_server.shutdown()
        await _cleanup(connection, names)


class _Names:
    """Random names so a benchmark never meets another run's queues."""

    def __init__(self) -> None:
        self.worker_id = str(uuid.uuid4())
        self.exchange = f"bench.{self.worker_id}"
        self.sink = f"bench.sink.{self.worker_id}"
        self.health_port = free_port()


class _Arrivals:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done = asyncio.Event()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except asyncio.TimeoutError:
            pass


async def _declare(channel: aio_pika.abc.AbstractChannel, names: _Names, worker_queue: bool):
    exchange = await channel.declare_exchange(names.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    sink = await channel.declare_queue(names.sink, durable=True, arguments={"x-queue-type": "quorum"})
    await sink.bind(exchange, "next")
    if worker_queue:
        # Declared as the worker will, so the messages wait for it.
        queue = await channel.declare_queue(
            f"worker_{names.worker_id}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, names.worker_id)
    return exchange, sink


def pipeline_message(index: int) -> bytes:
    return json.dumps(
        {
            "tracing_id": str(uuid.uuid4()),
            "tenant_id": 1,
            "access_token": "token",
            "received_at": int(time.time() * 1000),
            "pipeline_id": "bench",
            "step_index": 0,
            "pipeline_steps": ["this", "next"],
            "timestamp": int(time.time() * 1000),
            "payload": base64.b64encode(f"message {index}".encode()).decode(),
            "metadata": {"index": index},
        }
    ).encode()


async def publish_messages(exchange: aio_pika.abc.AbstractExchange, routing_key: str, count: int) -> None:
    """Publish with confirms, a window of them in flight at once."""
    for start in range(0, count, PUBLISH_WINDOW):
        batch = range(start, min(start + PUBLISH_WINDOW, count))
        await asyncio.gather(
            *(
                exchange.publish(aio_pika.Message(pipeline_message(i), message_id=f"bench-{i}"), routing_key)
                for i in batch
            )
        )


def zip_code(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


class CodeServer:
    """Serves `{"data": "<base64 zip>"}` at any path, like the controller's code endpoint."""

    def __init__(self, archive: bytes) -> None:
        body = json.dumps({"data": base64.b64encode(archive).decode(), "message": "ok"}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/source"

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_code(archive: bytes) -> CodeServer:
    return CodeServer(archive)


def start_worker(amqp_url: str, names: _Names, code: CodeServer, prefetch: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        WORKER_ID=names.worker_id,
        AMQP_HOST=amqp_url,
        AMQP_XCHG=names.exchange,
        CODE_URL=code.url,
        WORKER_HEALTH_PORT=str(names.health_port),
        WORKER_CODE_DIR=f"/tmp/dockerworker-bench-{names.worker_id}",
        WORKER_PREFETCH=str(prefetch),
    )
    root = str(Path(__file__).resolve().parent.parent)
    return subprocess.Popen(
        [sys.executable, "-m", "dockerworker", "run"], env=env, cwd=root, stdout=subprocess.DEVNULL
    )


def wait_ready(worker: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("worker was not ready in time")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _result(mode: str, count: int, arrivals: _Arrivals, started: float, published: float) -> dict[str, object]:
    if mode == "stream":
        elapsed = (arrivals.last or started) - started
    else:
        elapsed = (arrivals.last or 0.0) - (arrivals.first or 0.0)
    return {
        "mode": mode,
        "messages": count,
        "arrived": arrivals.count,
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(arrivals.count / elapsed, 1) if elapsed > 0 else None,
        "publish_s": round(published - started, 3) if mode == "stream" else None,
    }


async def _cleanup(connection: aio_pika.abc.AbstractConnection, names: _Names) -> None:
    channel = await connection.channel()
    for queue in (names.sink, f"worker_{names.worker_id}", f"worker_{names.worker_id}.retry"):
        await channel.queue_delete(queue)
    await channel.exchange_delete(names.exchange)
    await connection.close()


if __name__ == "__main__":
    sys.exit(main())
