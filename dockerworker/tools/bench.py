"""Throughput benchmark: the dockerworker beside the limit client, on a real broker.

Owns: nothing the runtime uses. For each fleet size (1, 5 and 20 workers by
default) it runs, in alternating rounds, N containers of the dockerworker
with a trivial `process` (`def process(msg): return msg`, in a SensorBucket
archive served over HTTP like the controller does) and N containers of the
limit client (`dockerworker.tools.limitclient`: the same consume → publish →
confirm → ack loop with the same prefetch, and nothing else), and prints
the dockerworker's rate as a fraction of the limit client's. Then it
measures the per-message latency (p50, p99) at half of the dockerworker's
maximum rate, for both.

    python -m dockerworker.tools.bench [--image workerctl/dockerworker:latest | --local]
                                 [--messages 10000] [--rounds 3] [--fleet 1,5,20]
                                 [--prefetch 64] [--latency-messages 10000] [--latency-rate R]
                                 [--profile DIR] [--worker-env NAME=VALUE]

How a rate is measured: each worker has its own queue, filled while the
workers are attached but frozen (`docker pause`, SIGSTOP), so that they all
start together (`--messages` split over the fleet, at least 4,000 each), and
its own next-step queue (a quorum queue, like the next worker's), whose
length is sampled (every 20 ms for one worker, 50 ms for a fleet): no
consumer of the benchmark's competes for the CPU. The rate is the messages
that arrived on the next-step queues while *every* worker of the fleet was
busy (from the first sample in which each had forwarded something to the
first in which one had forwarded all of its own), divided by that time. For
one worker that is its first arrival to its last.

`--image`: containers started the way workerctl starts one (host network,
read-only root, tmpfs /tmp, all capabilities dropped, no-new-privileges,
memory/CPU/pids limits). `--local`: subprocesses of this checkout.
`--profile DIR` (with --local): the dockerworker runs under `py-spy record`,
one file of folded stacks per worker in DIR (`--format raw`: feed it to
flamegraph.pl or speedscope, or grep it).

It also reports the CPU time per message of the workers (their cgroups, or
the processes), which depends less on what else the machine runs than the
rates do. Names are random per run; everything declared is deleted at the
end. The broker URL comes from AMQP_URL (default: the local test broker).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel

DEFAULT_AMQP_URL = "amqp://workerctl:workerctl@127.0.0.1:5672/%2f"
DEFAULT_IMAGE = "workerctl/dockerworker:latest"
TRIVIAL_CODE = "def process(msg):\n    return msg\n"
OURS = "dockerworker"
LIMIT = "limit client"
_READY_TIMEOUT_S = 60.0
# This folder, and where the worker image's `dockerworker` package would keep it.
TOOLS_DIR = Path(__file__).resolve().parent
_IMAGE_TOOLS_DIR = "/opt/dockerworker/dockerworker/tools"
# The limit client's containers (pika is in this one; scripts/build-images).
LIMIT_CLIENT_IMAGE = os.environ.get("BENCH_LIMIT_IMAGE", "workerctl/contract-worker:latest")
_STALL_TIMEOUT_S = 30.0
# Enough for a window of a second or more with every worker busy.
_MIN_PER_WORKER = 4_000


@dataclass(frozen=True)
class Setup:
    """What every measurement of one run shares."""

    amqp_url: str
    image: str | None  # None: local subprocesses
    prefetch: int
    code_url: str
    profile_dir: Path | None = None
    worker_env: tuple[tuple[str, str], ...] = ()  # extra environment of the dockerworker


@dataclass
class Rate:
    """One measurement of a fleet: its aggregate rate and CPU per message."""

    client: str
    workers: int
    messages_per_s: float | None
    cpu_us_per_message: float | None
    window_s: float


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    fleets = [int(size) for size in args.fleet.split(",") if size and size != "0"]
    code_server = CodeServer(zip_code({"usercode.py": TRIVIAL_CODE, "main.py": "import usercode\n"}))
    image = None if args.local else args.image
    worker_env = tuple((name, value) for name, _, value in (item.partition("=") for item in args.worker_env))
    setup = Setup(
        amqp_url, image, args.prefetch, code_server.url, Path(args.profile) if args.profile else None, worker_env
    )
    _say(f"workers: {'local subprocesses' if image is None else 'containers of ' + image}; prefetch {args.prefetch}; "
         f"load average {_load()}")
    try:
        rates = {size: measure_fleet(setup, size, args.messages, args.rounds) for size in fleets}
        latency = None
        ours_single = _median([r.messages_per_s for r in rates.get(1, []) if r.client == OURS])
        latency_rate = args.latency_rate or (ours_single / 2 if ours_single else None)
        if args.latency_messages and latency_rate:
            latency = measure_latency(setup, latency_rate, args.latency_messages)
    finally:
        code_server.shutdown()
    summary = summarise(rates, latency)
    print(json.dumps(summary))
    _say(f"load average at the end {_load()}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="run workers as containers of this image")
    parser.add_argument("--local", action="store_true", help="run workers as local subprocesses instead")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per fleet (at least 4,000 per worker)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per fleet size")
    parser.add_argument("--fleet", default="1,5,20", help="fleet sizes, comma-separated")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--latency-messages", type=int, default=10_000, help="0: skip the latency measurement")
    parser.add_argument(
        "--latency-rate", type=float, help="publish rate of the latency measurement (default: half the measured rate)"
    )
    parser.add_argument("--profile", help="with --local: py-spy profiles of the dockerworker into this directory")
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment of the dockerworker, e.g. WORKER_LOG_LEVEL=debug (repeatable)",
    )
    return parser


# -- rates -----------------------------------------------------------------------


def measure_fleet(setup: Setup, size: int, messages: int, rounds: int) -> list[Rate]:
    """`rounds` alternating rounds of the limit client and the dockerworker, `size` workers each."""
    per_worker = max(_MIN_PER_WORKER, messages // size)
    rates = []
    for round_ in range(rounds):
        for client in (LIMIT, OURS):
            rate = measure_rate(setup, client, size, per_worker)
            _say(f"{size:>3} × {client:<13} round {round_ + 1}: {_fmt(rate.messages_per_s)} msg/s over "
                 f"{rate.window_s:.2f} s, {_fmt(rate.cpu_us_per_message)} µs CPU/message")
            rates.append(rate)
    return rates


def measure_rate(setup: Setup, client: str, size: int, per_worker: int) -> Rate:
    with Broker(setup.amqp_url) as broker:
        lanes = [broker.lane() for _ in range(size)]
        with Fleet(setup, client, lanes) as fleet:
            fleet.wait_attached(broker)
            # Frozen while their queues fill, so that all start together.
            fleet.pause()
            broker.fill(lanes, per_worker)
            cpu_before = fleet.cpu_s()
            fleet.resume()
            samples = broker.sample_until_done(lanes, per_worker, interval=0.02 if size == 1 else 0.05)
            cpu = fleet.cpu_s()
        rate, window = busy_rate(samples, per_worker)
        done = sum(samples[-1][1])
        cpu_us = (cpu - cpu_before) / done * 1e6 if cpu is not None and cpu_before is not None and done > 0 else None
        return Rate(client, size, rate, None if cpu_us is None else round(cpu_us, 1), window)


def busy_rate(samples: list[tuple[float, list[int]]], per_worker: int) -> tuple[float | None, float]:
    """Messages per second while every lane was busy: from the first sample in
    which each lane has forwarded something to the first in which one lane is done."""
    start = next((s for s in samples if all(count > 0 for count in s[1])), None)
    end = next((s for s in samples if any(count >= per_worker for count in s[1])), None)
    if start is None or end is None or end[0] <= start[0]:
        return None, 0.0
    window = end[0] - start[0]
    return (sum(end[1]) - sum(start[1])) / window, window


# -- latency ----------------------------------------------------------------------


@dataclass
class Latency:
    client: str
    rate: float
    achieved: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def measure_latency(setup: Setup, rate: float, messages: int) -> list[Latency]:
    """Per-message latency (publish → arrival on the next step) at a steady `rate`."""
    results = []
    for client in (LIMIT, OURS):
        with Broker(setup.amqp_url) as broker:
            lane = broker.lane()
            with Fleet(setup, client, [lane]) as fleet:
                fleet.wait_attached(broker)
                with Arrivals(setup.amqp_url, lane.sink, messages) as arrivals:
                    started = time.perf_counter()
                    broker.publish_paced(lane, messages, rate)
                    arrivals.done.wait(timeout=messages / rate + _STALL_TIMEOUT_S)
                    achieved = arrivals.count / max(time.perf_counter() - started, 1e-9)
                latencies = sorted(arrivals.latencies_ms)
        if not latencies:
            continue
        result = Latency(client, rate, achieved, _pct(latencies, 50), _pct(latencies, 99), latencies[-1])
        _say(f"latency at {rate:,.0f} msg/s, {client:<13}: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
             f"max {result.max_ms:.1f} ms ({len(latencies)} messages)")
        results.append(result)
    return results


def _pct(sorted_values: list[float], percent: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


class Arrivals:
    """Consumes a next-step queue on its own connection and thread, noting each message's latency."""

    def __init__(self, amqp_url: str, queue: str, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.latencies_ms: list[float] = []
        self.done = threading.Event()
        self._connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._channel = self._connection.channel()
        self._channel.basic_qos(prefetch_count=1000)
        self._channel.basic_consume(queue, self._on_message, auto_ack=True)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "Arrivals":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self._thread.join(timeout=5)
        self._connection.close()

    def _on_message(self, _channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        now = time.time()
        self.latencies_ms.append((now - json.loads(body)["metadata"]["sent"]) * 1000)
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    def _serve(self) -> None:
        while not self.done.is_set():
            self._connection.process_data_events(time_limit=0.05)


# -- the broker side of a measurement -------------------------------------------------


@dataclass(frozen=True)
class Lane:
    """One worker's queues: where its input waits and where its results go."""

    worker_id: str
    exchange: str

    @property
    def queue(self) -> str:
        return f"worker_{self.worker_id}"

    @property
    def sink(self) -> str:
        return f"bench.sink.{self.worker_id}"

    @property
    def sink_key(self) -> str:
        return f"bench-next.{self.worker_id}"


class Broker:
    """The benchmark's own AMQP client: declares lanes, fills them, samples them, deletes them."""

    def __init__(self, amqp_url: str) -> None:
        self.exchange = f"bench.{uuid.uuid4()}"
        self._connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        self._lanes: list[Lane] = []

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *_: object) -> None:
        channel = self._connection.channel()
        for lane in self._lanes:
            for queue in (lane.sink, lane.queue, f"{lane.queue}.retry"):
                channel.queue_delete(queue)
        channel.exchange_delete(self.exchange)
        self._connection.close()

    def lane(self) -> Lane:
        lane = Lane(str(uuid.uuid4()), self.exchange)
        # Declared as the worker will, so the input waits for it; the next
        # step is another worker's queue: a quorum queue, like the real thing.
        for queue, key in ((lane.queue, lane.worker_id), (lane.sink, lane.sink_key)):
            self._channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            self._channel.queue_bind(queue, self.exchange, key)
        self._lanes.append(lane)
        return lane

    def fill(self, lanes: list[Lane], per_lane: int) -> None:
        """Publish `per_lane` messages to each lane, round-robin, as fast as the broker takes them."""
        # No publisher confirms: a synchronous call on the same channel
        # returns once the broker has routed everything published before it.
        bodies = [[pipeline_message(lane, index) for lane in lanes] for index in range(per_lane)]
        for index, row in enumerate(bodies):
            properties = pika.BasicProperties(message_id=f"bench-{index}", delivery_mode=2)
            for lane, body in zip(lanes, row):
                self._channel.basic_publish(self.exchange, lane.worker_id, body, properties)
        self._channel.exchange_declare(self.exchange, passive=True)

    def publish_paced(self, lane: Lane, count: int, rate: float) -> None:
        """Publish `count` messages at `rate` per second, in bursts every 5 ms."""
        started = time.perf_counter()
        for index in range(count):
            due = started + index / rate
            delay = due - time.perf_counter()
            if delay > 0.005:
                self._connection.sleep(delay)
            self._publish(lane, index)

    def _publish(self, lane: Lane, index: int) -> None:
        properties = pika.BasicProperties(message_id=f"bench-{index}", delivery_mode=2)
        self._channel.basic_publish(self.exchange, lane.worker_id, pipeline_message(lane, index), properties)

    def consumers(self, lane: Lane) -> int:
        return int(self._channel.queue_declare(lane.queue, passive=True).method.consumer_count)

    def sink_count(self, lane: Lane) -> int:
        return int(self._channel.queue_declare(lane.sink, passive=True).method.message_count)

    def sample_until_done(self, lanes: list[Lane], per_worker: int, interval: float) -> list[tuple[float, list[int]]]:
        """(time, arrivals per lane) every `interval` until every lane has all, or nothing moves."""
        samples: list[tuple[float, list[int]]] = []
        last_progress = time.perf_counter()
        while True:
            now = time.perf_counter()
            counts = [self.sink_count(lane) for lane in lanes]
            if samples and sum(counts) > sum(samples[-1][1]):
                last_progress = now
            samples.append((now, counts))
            if all(count >= per_worker for count in counts) or now - last_progress > _STALL_TIMEOUT_S:
                return samples
            self._connection.sleep(interval)


def pipeline_message(lane: Lane, index: int) -> bytes:
    now = int(time.time() * 1000)
    return json.dumps(
        {
            "tracing_id": str(uuid.uuid4()),
            "tenant_id": 1,
            "access_token": "token",
            "received_at": now,
            "pipeline_id": "bench",
            "step_index": 0,
            "pipeline_steps": [lane.worker_id, lane.sink_key],
            "timestamp": now,
            "payload": base64.b64encode(f"message {index}".encode()).decode(),
            "metadata": {"index": index, "sent": time.time()},
        }
    ).encode()


# -- the workers -----------------------------------------------------------------------


class Fleet:
    """The workers under test, one per lane: dockerworkers or limit clients,
    containers or local subprocesses."""

    def __init__(self, setup: Setup, client: str, lanes: list[Lane]) -> None:
        self.setup = setup
        self.client = client
        self.lanes = lanes
        # All at once, so that the last starts soon after the first.
        with ThreadPoolExecutor(max_workers=max(1, min(len(lanes), 20))) as pool:
            self.workers = list(pool.map(self._start, lanes))

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *_: object) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda worker: worker.stop(), self.workers))

    def _start(self, lane: Lane) -> "_Worker":
        env = dict(
            WORKER_ID=lane.worker_id,
            AMQP_HOST=self.setup.amqp_url,
            AMQP_XCHG=lane.exchange,
            CODE_URL=self.setup.code_url,
            WORKER_HEALTH_PORT="0",
            WORKER_PREFETCH=str(self.setup.prefetch),
        )
        if self.client == OURS:
            env.update(self.setup.worker_env)
        module = "dockerworker" if self.client == OURS else "dockerworker.tools.limitclient"
        args = ["run"] if self.client == OURS else []
        if self.setup.image is not None:
            return _Container.start(self.setup.image, env, module, args)
        profile = self.setup.profile_dir if self.client == OURS else None
        return _Process.start(env, module, args, profile)

    def wait_attached(self, broker: Broker) -> None:
        """Until every worker has a consumer on its queue."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        waiting = list(zip(self.lanes, self.workers))
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} {self.client} workers not consuming after {_READY_TIMEOUT_S:.0f} s")
            for lane, worker in list(waiting):
                code = worker.exited()
                if code is not None:
                    raise RuntimeError(f"a {self.client} worker exited with {code} before it consumed")
                if broker.consumers(lane) > 0:
                    waiting.remove((lane, worker))
            time.sleep(0.05)

    def pause(self) -> None:
        self._each(lambda worker: worker.pause())

    def resume(self) -> None:
        self._each(lambda worker: worker.resume())

    def _each(self, action: Callable[[_Worker], None]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(len(self.workers), 20))) as pool:
            list(pool.map(action, self.workers))

    def cpu_s(self) -> float | None:
        times = [worker.cpu_s() for worker in self.workers]
        return None if any(t is None for t in times) else sum(t for t in times if t is not None)


class _Worker:
    def exited(self) -> int | None:
        raise NotImplementedError

    def pause(self) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    def cpu_s(self) -> float | None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _Container(_Worker):
    def __init__(self, name: str) -> None:
        self.name = name
        self._pid: int | None = None

    @classmethod
    def start(cls, image: str, env: dict[str, str], module: str, args: list[str]) -> "_Container":
        """Starts the worker as workerctl would (see src/runtime/docker.rs)."""
        hardening = [
            "--network", "host", "--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,nodev,size=64m",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
            "--memory", "256m", "--memory-swap", "256m", "--cpus", "1", "--pids-limit", "128",
        ]
        env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        name = f"dockerworker-bench-{env['WORKER_ID']}"
        # The tools are not in the image: the limit client comes from this
        # checkout, and runs on the contract image (the worker image's Python
        # and venv, with pika added: the dockerworker itself does not use it).
        tools: list[str] = []
        if module.startswith("dockerworker.tools."):
            image = LIMIT_CLIENT_IMAGE
            tools = ["-v", f"{TOOLS_DIR}:{_IMAGE_TOOLS_DIR}:ro", "-e", "PYTHONPATH=/opt/dockerworker", "--user", "10001:10001"]
        entry = ["--entrypoint", "tini", image, "--", "python", "-m", module, *args]
        run = subprocess.run(["docker", "run", "-d", "--name", name, *hardening, *tools, *env_args, *entry],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"docker run of {image} failed (is it built? scripts/build-images): {run.stderr}")
        return cls(name)

    def exited(self) -> int | None:
        state = _docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", self.name).split()
        return None if state[0] == "true" else int(state[1])

    def pause(self) -> None:
        self._control("pause")

    def resume(self) -> None:
        self._control("unpause")

    def _control(self, command: str) -> None:
        done = subprocess.run(["docker", command, self.name], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            logs = subprocess.run(["docker", "logs", "--tail", "5", self.name], capture_output=True, text=True)
            raise RuntimeError(
                f"docker {command} {self.name} failed ({done.stderr.strip()}); exit code {self.exited()}; "
                f"last lines: {logs.stdout.strip()} {logs.stderr.strip()}"
            )

    def cpu_s(self) -> float | None:
        if self._pid is None:
            self._pid = int(_docker("inspect", "--format", "{{.State.Pid}}", self.name))
        return container_cpu_s(self._pid)

    def stop(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, check=False)


class _Process(_Worker):
    def __init__(self, process: subprocess.Popen[bytes], measured: bool) -> None:
        self.process = process
        self.measured = measured

    @classmethod
    def start(cls, env: dict[str, str], module: str, args: list[str], profile: Path | None) -> "_Process":
        local = {**os.environ, **env, "WORKER_CODE_DIR": f"/tmp/dockerworker-bench-{env['WORKER_ID']}"}
        root = str(Path(__file__).resolve().parents[2])
        command = [sys.executable, "-m", module, *args]
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            output = profile / f"{env['WORKER_ID']}.folded"
            command = [spy, "record", "--rate", "250", "--format", "raw", "--output", str(output), "--", *command]
        process = subprocess.Popen(
            command, env=local, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        return cls(process, measured=profile is None)

    def exited(self) -> int | None:
        return self.process.poll()

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.process.pid) if self.measured else None

    def stop(self) -> None:
        # py-spy writes its profile when interrupted, and stops its child.
        self.process.send_signal(signal.SIGTERM if self.measured else signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


# -- code endpoint, CPU accounting -----------------------------------------------------------


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
        port: int = sock.getsockname()[1]
        return port


# -- the report ---------------------------------------------------------------------------------


def summarise(rates: dict[int, list[Rate]], latency: list[Latency] | None) -> dict[str, Any]:
    """Print the table (stderr) and return the figures as one JSON-able value."""
    table: dict[str, Any] = {"fleets": [], "latency": []}
    _say("")
    _say("workers  client         rounds (msg/s)                median   of limit  CPU µs/message")
    for size, measured in rates.items():
        row: dict[str, Any] = {"workers": size}
        for client in (LIMIT, OURS):
            mine = [r for r in measured if r.client == client]
            values = [r.messages_per_s for r in mine]
            median = _median(values)
            cpu = _median([r.cpu_us_per_message for r in mine])
            row[client] = {"rounds": values, "median": median, "cpu_us_per_message": cpu}
        limit, ours = row[LIMIT]["median"], row[OURS]["median"]
        row["fraction_of_limit"] = round(ours / limit, 3) if limit and ours else None
        for client in (LIMIT, OURS):
            part = row[client]
            share = f"{row['fraction_of_limit']:.0%}" if client == OURS and row["fraction_of_limit"] else ""
            rounds = " ".join(_fmt(v) for v in part["rounds"])
            _say(f"{size:>7}  {client:<13}  {rounds:<28}  {_fmt(part['median']):>7}  {share:>8}  "
                 f"{_fmt(part['cpu_us_per_message']):>14}")
        table["fleets"].append(row)
    for result in latency or []:
        _say(f"latency at {result.rate:,.0f} msg/s (achieved {result.achieved:,.0f}), {result.client}: "
             f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, max {result.max_ms:.1f} ms")
        table["latency"].append(result.__dict__)
    return table


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
