"""Throughput benchmark: N messages through one worker process and a real broker.

Owns: nothing the runtime uses. It starts `python -m dockerworker run` as a
subprocess with a trivial `process` (served over HTTP like the controller
does), publishes N pipeline messages to the worker's routing key and times
their arrival on the next step's queue.

    python -m dockerworker.bench [--messages 10000] [--mode stream|preload]
                                 [--image workerctl/dockerworker:latest]

`--image`: the worker runs as a container of that image, started the way
workerctl starts one (host network, read-only root, tmpfs /tmp, all
capabilities dropped, no-new-privileges, memory/CPU/pids limits); without
it, as a local subprocess.

`stream`: the worker is running and ready; the clock runs from the first
publish to the last arrival (end to end, publisher included).
`preload`: the messages wait in the queue before the worker starts; the
clock runs from the first arrival to the last (the worker's drain rate).
It also reports the worker's CPU time per message, which, unlike the rates,
does not depend on what else the machine is running.
Names are random per run, and everything declared is deleted at the end.
The broker URL comes from AMQP_URL (default: the local test broker).
"""

from __future__ import annotations

import argparse
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

import pika

DEFAULT_AMQP_URL = "amqp://workerctl:workerctl@127.0.0.1:5672/%2f"
TRIVIAL_CODE = "def process(msg):\n    return msg\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.bench")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--mode", choices=("stream", "preload"), default="stream")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--image", help="run the worker as a container of this image")
    args = parser.parse_args()
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    result = bench(amqp_url, args.messages, args.mode, args.prefetch, args.image)
    print(json.dumps(result))
    return 0 if result["arrived"] == args.messages else 1


def bench(amqp_url: str, count: int, mode: str, prefetch: int, image: str | None = None) -> dict[str, object]:
    names = _Names()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    code_server = CodeServer(zip_code({"usercode.py": TRIVIAL_CODE}))
    worker: _Worker | None = None
    sink: _Sink | None = None
    try:
        channel = connection.channel()
        _declare(channel, names, worker_queue=(mode == "preload"))
        sink = _Sink(amqp_url, names.sink, count)
        if mode == "preload":
            publish_messages(channel, names, count)
        worker = start_worker(amqp_url, names, code_server, prefetch, image)
        wait_ready(worker, names.health_port)
        cpu_before = worker.cpu_s()
        started = time.perf_counter()
        if mode == "stream":
            publish_messages(channel, names, count)
        published = time.perf_counter()
        sink.done.wait(timeout=max(60.0, count / 100))
        result = _result(mode, count, sink, started, published)
        result["worker"] = f"container of {image}" if image else "subprocess"
        result["worker_cpu_us_per_message"] = round((worker.cpu_s() - cpu_before) / max(sink.count, 1) * 1e6)
        return result
    finally:
        if worker is not None:
            worker.stop()
        if sink is not None:
            sink.stop()
        code_server.shutdown()
        _cleanup(connection, names)


class _Names:
    """Random names so a benchmark never meets another run's queues."""

    def __init__(self) -> None:
        self.worker_id = str(uuid.uuid4())
        self.exchange = f"bench.{self.worker_id}"
        self.sink = f"bench.sink.{self.worker_id}"
        self.health_port = free_port()


class _Sink:
    """Counts arrivals on the next step's queue, on its own connection and thread."""

    def __init__(self, amqp_url: str, queue: str, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self._connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._channel = self._connection.channel()
        self._channel.basic_qos(prefetch_count=1000)
        self._channel.basic_consume(queue, self._on_message, auto_ack=True)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _on_message(self, *_: object) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    def _serve(self) -> None:
        while not self.done.is_set():
            self._connection.process_data_events(time_limit=0.1)

    def stop(self) -> None:
        self.done.set()
        self._thread.join(timeout=5)
        self._connection.close()


def _declare(channel: pika.adapters.blocking_connection.BlockingChannel, names: _Names, worker_queue: bool) -> None:
    channel.exchange_declare(names.exchange, exchange_type="topic", durable=True)
    # The next step is another worker: a quorum queue, like the real thing.
    channel.queue_declare(names.sink, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(names.sink, names.exchange, "next")
    if worker_queue:
        # Declared as the worker will, so the messages wait for it.
        queue = f"worker_{names.worker_id}"
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(queue, names.exchange, names.worker_id)


def pipeline_message(index: int) -> bytes:
    now = int(time.time() * 1000)
    return json.dumps(
        {
            "tracing_id": str(uuid.uuid4()),
            "tenant_id": 1,
            "access_token": "token",
            "received_at": now,
            "pipeline_id": "bench",
            "step_index": 0,
            "pipeline_steps": ["this", "next"],
            "timestamp": now,
            "payload": base64.b64encode(f"message {index}".encode()).decode(),
            "metadata": {"index": index},
        }
    ).encode()


def publish_messages(channel: pika.adapters.blocking_connection.BlockingChannel, names: _Names, count: int) -> None:
    # No publisher confirms here: the sink counts what arrives, and a
    # confirm per message would make the publisher the bottleneck.
    for index in range(count):
        properties = pika.BasicProperties(message_id=f"bench-{index}", delivery_mode=2)
        channel.basic_publish(names.exchange, names.worker_id, pipeline_message(index), properties)


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


class _Worker:
    """The worker under test: a local subprocess, or a container."""

    def __init__(self, process: subprocess.Popen[bytes], container: str | None = None) -> None:
        self.process = process
        self.container = container

    def exited(self) -> int | None:
        if self.container is None:
            return self.process.poll()
        state = _docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", self.container).split()
        return None if state[0] == "true" else int(state[1])

    def cpu_s(self) -> float:
        if self.container is None:
            return process_cpu_s(self.process.pid)
        return container_cpu_s(int(_docker("inspect", "--format", "{{.State.Pid}}", self.container)))

    def stop(self) -> None:
        if self.container is not None:
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, check=False)
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_worker(amqp_url: str, names: _Names, code: CodeServer, prefetch: int, image: str | None) -> _Worker:
    env = dict(
        WORKER_ID=names.worker_id,
        AMQP_HOST=amqp_url,
        AMQP_XCHG=names.exchange,
        CODE_URL=code.url,
        WORKER_HEALTH_PORT=str(names.health_port),
        WORKER_PREFETCH=str(prefetch),
    )
    if image is not None:
        return _Worker(*_start_container(image, env))
    local = {**os.environ, **env, "WORKER_CODE_DIR": f"/tmp/dockerworker-bench-{names.worker_id}"}
    root = str(Path(__file__).resolve().parent.parent)
    command = [sys.executable, "-m", "dockerworker", "run"]
    return _Worker(subprocess.Popen(command, env=local, cwd=root, stdout=subprocess.DEVNULL))


def _start_container(image: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Starts the worker as workerctl would (see src/runtime/docker.rs)."""
    hardening = [
        "--network", "host", "--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,nodev,size=64m",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "--memory", "256m", "--memory-swap", "256m", "--cpus", "1", "--pids-limit", "128",
    ]
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    name = f"dockerworker-bench-{env['WORKER_ID']}"
    run = ["docker", "run", "-d", "--name", name, *hardening, *env_args, image]
    process = subprocess.Popen(run, stdout=subprocess.DEVNULL)
    if process.wait() != 0:
        raise RuntimeError(f"docker run of {image} failed (is it built? scripts/build-images)")
    return process, name


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def wait_ready(worker: _Worker, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = worker.exited()
        if code is not None:
            raise RuntimeError(f"worker exited with {code} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("worker was not ready in time")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def container_cpu_s(pid: int) -> float:
    """CPU seconds used by every process of the container holding `pid`, from
    its cgroup (v1 cpuacct or v2 cpu.stat)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            usage = Path(f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage")
            if not usage.exists():
                usage = Path(f"/sys/fs/cgroup/cpu,cpuacct{path}/cpuacct.usage")
            return int(usage.read_text()) / 1e9
        if controllers == "":
            for stat in Path(f"/sys/fs/cgroup{path}/cpu.stat").read_text().splitlines():
                if stat.startswith("usage_usec "):
                    return int(stat.split()[1]) / 1e6
    raise RuntimeError(f"no CPU accounting found for pid {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _result(mode: str, count: int, sink: _Sink, started: float, published: float) -> dict[str, object]:
    if mode == "stream":
        elapsed = (sink.last or started) - started
    else:
        elapsed = (sink.last or 0.0) - (sink.first or 0.0)
    return {
        "mode": mode,
        "messages": count,
        "arrived": sink.count,
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(sink.count / elapsed, 1) if elapsed > 0 else None,
        "publish_s": round(published - started, 3) if mode == "stream" else None,
    }


def _cleanup(connection: pika.BlockingConnection, names: _Names) -> None:
    channel = connection.channel()
    for queue in (names.sink, f"worker_{names.worker_id}", f"worker_{names.worker_id}.retry"):
        channel.queue_delete(queue)
    channel.exchange_delete(names.exchange)
    connection.close()


if __name__ == "__main__":
    sys.exit(main())
