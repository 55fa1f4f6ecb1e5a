"""Start-up benchmark: `docker run` of a worker image → its consumer attached.

Owns: nothing the runtime uses. It starts containers of one or more images
the way workerctl starts them (host network, read-only root, tmpfs /tmp and
/usercode, all capabilities dropped, no-new-privileges, limits), each with a
trivial `process` served over HTTP like the controller does, and times how
long each takes until it consumes its queue:

    python -m dockerworker.tools.startbench [--runs 10] [--probe report|readyz]
                                      [--image workerctl/dockerworker:latest ...]

`--probe report` (the default) listens for the ready report the runtime
sends to WORKER_READY_URL once its consumer is attached; `--probe readyz`
polls the container's `/readyz` every 10 ms instead, for images that do not
send the report (older ones). With several `--image`s the runs are
interleaved (one of each per round), so that the machine's load, which
drifts, weighs on every image alike.

Per run it reports `run→ready` (from calling `docker run` to the report:
what a rollout waits for) and `start→ready` (from the container's
`State.StartedAt`, as the engine records it, to the report: the image's own
start path, without the engine's container creation), and the CPU time the
container had used when it was ready (from its cgroup; unlike the times, it
hardly depends on what else the machine runs). The worker's queue is
created by a first, unreported run, so the timed runs see it already there,
as a new revision of a worker does. Before timing, it counts for each image
how many of the modules the start path imports come from compiled bytecode
and how many are compiled from source (`python -v` in a read-only
container): a figure the machine's load does not change. Names are random per run, and
everything declared is deleted at the end through the management API
(RABBITMQ_API, default http://workerctl:workerctl@127.0.0.1:15672).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from ..bundle import START_PATH

DEFAULT_AMQP_URL = "amqp://workerctl:workerctl@127.0.0.1:5672/%2f"
DEFAULT_API = "http://workerctl:workerctl@127.0.0.1:15672"
TRIVIAL_CODE = "def process(msg):\n    return msg\n"
SENSORBUCKET_MAIN = "import usercode\n\ndef main(message):\n    return usercode.process(message)\n"
_POLL_S = 0.01


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    images: list[str] = args.image or ["workerctl/dockerworker:latest"]
    for image in images:
        from_bytecode, from_source = bytecode_check(image)
        print(f"{image}: start path imports {from_bytecode} modules from .pyc, compiles {from_source} from source")
    bench = StartBench(args.amqp_url, args.api, args.probe)
    try:
        results = bench.run(images, args.runs)
    finally:
        bench.close()
    print(_report(results, args.probe))
    return 0


def bytecode_check(image: str) -> tuple[int, int]:
    """(modules loaded from .pyc, modules compiled from source) when the runtime's start path is imported."""
    # Modules served from the start path's bundle (dockerworker.bundle, in
    # images that have one) do not show in -v's lines: the bundle says.
    script = (
        "try:\n"
        "    from dockerworker import bundle\n"
        "    bundle.install()\n"
        "except ImportError:\n"
        "    pass\n"
        f"{START_PATH}\n"
        "import sys\n"
        "index = sys.modules.get('dockerworker.bundle')\n"
        "print('indexed', len(getattr(index, 'served', [])), len(getattr(index, 'compiled', [])))"
    )
    command = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", "python", image, "-v", "-c", script]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    loaded = [line for line in run.stderr.splitlines() if line.startswith("# code object from ")]
    from_bytecode = sum(line.rstrip("'").endswith(".pyc") for line in loaded)
    indexed = [line.split() for line in run.stdout.splitlines() if line.startswith("indexed ")]
    served, compiled = (int(indexed[-1][1]), int(indexed[-1][2])) if indexed else (0, 0)
    return from_bytecode + served, len(loaded) - from_bytecode + compiled


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.tools.startbench")
    parser.add_argument("--image", action="append", help="an image to time (repeatable)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per image (after one warm-up run)")
    parser.add_argument("--probe", choices=("report", "readyz"), default="report")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--api", default=DEFAULT_API, help="RabbitMQ management API, for the clean-up")
    return parser


# The runtime's start-up log events, in the order they happen; each is timed
# from the container's start (`startbench` prints their medians, where an
# image logs them).
PHASES = ("starting", "code_loaded", "consuming")


@dataclass
class Timing:
    run_to_ready_s: float
    start_to_ready_s: float
    cpu_s: float | None
    # Seconds from the container's start to each of PHASES it logged.
    phases_s: dict[str, float] = field(default_factory=dict)


@dataclass
class _Target:
    image: str
    worker_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timings: list[Timing] = field(default_factory=list)


class StartBench:
    def __init__(self, amqp_url: str, api: str, probe: str) -> None:
        self.amqp_url = amqp_url
        self.api = api
        self.probe = probe
        self.exchange = f"startbench.{uuid.uuid4()}"
        self.code = _HttpServer(_code_answer(_sensorbucket_zip(TRIVIAL_CODE)))
        self.ready = _ReadyListener()
        self._targets: list[_Target] = []
        self._other_workers: list[str] = []

    def forget_queue(self, worker_id: str) -> None:
        """Delete this worker's queues at `close` (a worker started by someone else)."""
        self._other_workers.append(worker_id)

    def run(self, images: list[str], runs: int) -> dict[str, list[Timing]]:
        self._targets = [_Target(image) for image in images]
        for round_ in range(runs + 1):
            for target in self._targets:
                timing = self._one(target)
                if round_ > 0:  # the first one creates the queue
                    target.timings.append(timing)
        return {target.image: target.timings for target in self._targets}

    def _one(self, target: _Target) -> Timing:
        token = uuid.uuid4().hex
        health_port = _free_port()
        env = {
            "WORKER_ID": target.worker_id,
            "AMQP_HOST": self.amqp_url,
            "AMQP_XCHG": self.exchange,
            "CODE_URL": self.code.url + f"/{target.worker_id}/source",
            "WORKER_HEALTH_PORT": str(health_port),
            "WORKER_READY_URL": f"{self.ready.url}/ready?token={token}",
        }
        name = f"startbench-{token[:12]}"
        started = time.monotonic()
        container_id = _docker_run(name, target.image, env)
        try:
            if self.probe == "report":
                ready_at = self.ready.wait(token, lambda: _exited(name))
            else:
                ready_at = _poll_readyz(health_port, lambda: _exited(name))
            cpu_s = container_cpu_s(container_id)
            started_wall = _started_at(name)
            phases = {event: at - started_wall for event, at in _logged_phases(name).items()}
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        ready_wall = time.time() - (time.monotonic() - ready_at)
        return Timing(ready_at - started, ready_wall - started_wall, cpu_s, phases)

    def close(self) -> None:
        for worker_id in [target.worker_id for target in self._targets] + self._other_workers:
            for queue in (f"worker_{worker_id}", f"worker_{worker_id}.retry"):
                self._api_delete(f"/api/queues/%2f/{urllib.parse.quote(queue, safe='')}")
        self._api_delete(f"/api/exchanges/%2f/{urllib.parse.quote(self.exchange, safe='')}")
        self.code.close()
        self.ready.close()

    def _api_delete(self, path: str) -> None:
        parts = urllib.parse.urlsplit(self.api)
        request = urllib.request.Request(f"{parts.scheme}://{parts.hostname}:{parts.port}{path}", method="DELETE")
        credentials = f"{parts.username}:{parts.password}".encode()
        request.add_header("authorization", "Basic " + base64.b64encode(credentials).decode())
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as error:
            if error.code != 404:
                print(f"clean-up of {path} failed: {error}")


def _docker_run(name: str, image: str, env: dict[str, str], extra: list[str] | None = None) -> str:
    """Starts the worker as workerctl does by default (see src/runtime/docker.rs)."""
    hardening = [
        "--network", "host", "--read-only",
        "--tmpfs", "/tmp:rw,exec,nosuid,nodev,size=64m", "--tmpfs", "/usercode:rw,exec,nosuid,nodev,size=64m",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "--memory", "256m", "--memory-swap", "256m", "--cpus", "1", "--pids-limit", "128",
    ]  # fmt: skip
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    command = ["docker", "run", "-d", "--name", name, *hardening, *(extra or []), *env_args, image]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"docker run of {image} failed (is it built? scripts/build-images): {run.stderr}")
    return run.stdout.strip()


def _logged_phases(name: str) -> dict[str, float]:
    """The wall-clock time of each of PHASES in the container's log (its `ts`)."""
    run = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=False)
    phases: dict[str, float] = {}
    for line in (run.stdout + run.stderr).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in PHASES and "ts" in record:
            stamp = str(record["ts"]).replace("Z", "+00:00")
            phases.setdefault(str(record["event"]), datetime.fromisoformat(stamp).timestamp())
    return phases


def container_cpu_s(container_id: str) -> float | None:
    """CPU seconds (user + system) the container's cgroup has used; None where it cannot be read."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage")
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat")
    try:
        if v1.exists():
            return int(v1.read_text()) / 1e9
        for line in v2.read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    return None


def _exited(name: str) -> bool:
    state = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    return not state or state[0] != "true"


def _started_at(name: str) -> float:
    raw = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.StartedAt}}", name], capture_output=True, text=True, check=True
    ).stdout.strip()
    # RFC 3339 with nanoseconds; fromisoformat takes at most microseconds.
    seconds, _, fraction = raw.rstrip("Z").partition(".")
    return datetime.fromisoformat(seconds + "+00:00").timestamp() + float("0." + (fraction or "0"))


def _poll_readyz(port: int, exited: Callable[[], bool], timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    checked_exit = time.monotonic()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        if time.monotonic() - checked_exit > 1.0:
            checked_exit = time.monotonic()
            if exited():
                raise RuntimeError("the worker exited before it was ready")
        time.sleep(_POLL_S)
    raise RuntimeError("the worker was not ready in time")


class _ReadyListener:
    """Receives the ready reports; remembers when each token arrived (time.monotonic())."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.changed = threading.Condition()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                now = time.monotonic()
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                with listener.changed:
                    for token in query.get("token", []):
                        listener.arrived.setdefault(token, now)
                    listener.changed.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def wait(self, token: str, exited: Callable[[], bool], timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        with self.changed:
            while token not in self.arrived:
                if time.monotonic() > deadline:
                    raise RuntimeError("no ready report in time (does the image send one? try --probe readyz)")
                if not self.changed.wait(timeout=1.0) and exited():
                    raise RuntimeError("the worker exited before it was ready")
            return self.arrived[token]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _HttpServer:
    """Answers every GET with one JSON body (the code endpoint)."""

    def __init__(self, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _sensorbucket_zip(usercode: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("usercode.py", usercode)
        archive.writestr("main.py", SENSORBUCKET_MAIN)
    return buffer.getvalue()


def _code_answer(archive: bytes) -> bytes:
    return json.dumps({"data": base64.b64encode(archive).decode(), "message": "source code"}).encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _report(results: dict[str, list[Timing]], probe: str) -> str:
    lines = [
        f"probe: {probe}",
        "| image | runs | run→ready median (min–max) | start→ready median (min–max) | CPU to ready median (min–max) |",
        "|---|---|---|---|---|",
    ]
    for image, timings in results.items():
        run = [t.run_to_ready_s * 1000 for t in timings]
        start = [t.start_to_ready_s * 1000 for t in timings]
        cpu = [t.cpu_s * 1000 for t in timings if t.cpu_s is not None]
        lines.append(f"| `{image}` | {len(timings)} | {_spread(run)} | {_spread(start)} | {_spread(cpu) if cpu else 'n/a'} |")
    lines += ["", "start → each logged event, median ms (where every run logged it):"]
    for image, timings in results.items():
        logged = [p for p in PHASES if all(p in t.phases_s for t in timings)]
        medians = ", ".join(f"{p} {statistics.median(t.phases_s[p] * 1000 for t in timings):.0f}" for p in logged)
        lines.append(f"- `{image}`: {medians or 'none logged'}")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms ({min(values):.0f}–{max(values):.0f})"


if __name__ == "__main__":
    raise SystemExit(main())
