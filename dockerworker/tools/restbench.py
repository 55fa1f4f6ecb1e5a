"""The rest-and-start benchmark: floors, start → consuming, and idle workers under the daemon.

Owns: nothing the runtime uses. One run prints, each beside the floors
measured in the same run:

1. **Floors**: a busybox container, start → exit; `python -c pass` in the
   worker image; `python -c` of the start path's imports (the runtime's
   `app`, `__main__` and `messaging` with all they import) in the worker
   image and, with `--before`, in an older one. Each as the engine times it (`StartedAt`
   → `FinishedAt`) and from the `docker run` call to `FinishedAt`.
2. **Start → consuming** of the worker image (`startbench`: `docker run` with
   workerctl's flags, until the ready report arrives), median and p90, from
   the `docker run` call and from `StartedAt`.
3. **Idle workers under the daemon**: the workerctl binary (`--daemon`) on a
   throwaway database, with 10 and then 50 enabled workers on the worker
   image; once every worker's status is `ready` and a minute has passed (a
   worker repeats its ready report for its first minute), a window of
   nothing as long as the image's health-check interval (120 s: the checks of
   a fleet started together run together, so a shorter window holds all of
   them or none): the CPU of the containers (their
   cgroups), of the daemon process, of the engine and of the whole machine,
   and the memory per container (`idlebench`). Before each fleet, with no
   daemon and no workers, a window as long: the machine's background, the
   same run's floor for the whole machine; the workers' cost is the
   difference. Both windows are split by process (containers, engine, broker,
   database, daemon, this benchmark, other).

    python -m dockerworker.tools.restbench --daemon target/release/workerctl
        [--image workerctl/dockerworker:latest] [--before IMAGE]
        [--runs 20] [--workers 10,50] [--seconds 120] [--settle 60]
        [--idle-only] [--broker-pid PID]

Save → first answer needs a worker saved through the daemon and traffic:
`cargo bench --bench rollout` (BENCH_SAVES=20) measures it; scripts/bench
runs both, one after the other. Needs Docker, Postgres (DATABASE_URL; the
role must be allowed to create databases), RabbitMQ (AMQP_URL, and the
management API for the clean-up) and `psql`. Everything it makes is removed
at the end, also when a measurement fails.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import time
import urllib.parse
import uuid
from datetime import datetime
from pathlib import Path
from typing import IO

from ..bundle import START_PATH
from .idlebench import Idle, measure_fleet
from .startbench import DEFAULT_AMQP_URL, DEFAULT_API, TRIVIAL_CODE, StartBench, _free_port, _sensorbucket_zip

DEFAULT_DATABASE_URL = "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl"
BUSYBOX = "workerctl/busybox:latest"
_FLOOR_RUNS = 10


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    print(f"load average at start: {_load()}", flush=True)
    if not args.idle_only:
        _start(args, amqp_url)
    if args.daemon:
        for size in (int(n) for n in args.workers.split(",")):
            fleet = DaemonFleet(args.daemon, args.image, amqp_url, size, args.broker_pid)
            background, idle = fleet.measure(args.seconds, args.settle)
            print(background.line("background, no workers: "), flush=True)
            print(idle.line("idle under the daemon:   "), flush=True)
            print(f"  split, % of a core   background: {background.split()}", flush=True)
            print(f"                       {size:3d} workers: {idle.split()}", flush=True)
            print(
                f"  {size} workers' cost: machine {(idle.machine_cpu - background.machine_cpu) * 100:+.1f} % of a core"
                f" over the background; named processes (containers, engine, broker, database, daemon)"
                f" {_ours(idle) * 100:.2f} % against {_ours(background) * 100:.2f} % in the background",
                flush=True,
            )
    print(f"load average at end: {_load()}", flush=True)
    return 0


def _ours(idle: Idle) -> float:
    return sum(idle.groups[name] for name in ("containers", "engine", "broker", "database", "daemon"))


def _start(args: argparse.Namespace, amqp_url: str) -> None:
    floors = [
        ("busybox start → exit", _floor(BUSYBOX, ["true"], entrypoint=None)),
        ("python -c pass", _floor(args.image, ["-c", "pass"])),
        ("the start path's imports", _floor(args.image, ["-c", START_PATH])),
    ]
    if args.before:
        floors.append((f"  the same in {args.before}", _floor(args.before, ["-c", START_PATH])))
    for label, (engine, from_run) in floors:
        print(f"floor  {label:42s} {_stats(engine)}   (docker run → exit {_stats(from_run)})", flush=True)
    bench = StartBench(amqp_url, DEFAULT_API, "report")
    try:
        timings = bench.run([args.image], args.runs)[args.image]
    finally:
        bench.close()
    pass_floor = statistics.median(floors[1][1][0])
    start = [t.start_to_ready_s * 1000 for t in timings]
    run = [t.run_to_ready_s * 1000 for t in timings]
    print(
        f"start → consuming (n={len(start)}), StartedAt → ready report: {_stats(start)}"
        f"  = floor + {statistics.median(start) - pass_floor:.0f} ms   (docker run → ready {_stats(run)})",
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.tools.restbench")
    parser.add_argument("--image", default="workerctl/dockerworker:latest")
    parser.add_argument("--before", help="an older worker image, for the import floor beside it")
    parser.add_argument("--daemon", help="the workerctl binary (without it, no idle figures)")
    parser.add_argument("--runs", type=int, default=20, help="start → consuming runs (after one warm-up)")
    parser.add_argument("--workers", default="10,50", help="idle fleet sizes")
    parser.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="the idle window: the health check's interval, so that each container's check runs in it once",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="wait after the last worker is ready (a worker repeats its ready report for its first minute)",
    )
    parser.add_argument(
        "--broker-pid", type=int, help="the broker's process, when AMQP_URL is a broker of one's own (else any RabbitMQ)"
    )
    parser.add_argument("--idle-only", action="store_true", help="only the idle fleets (no floors, no starts)")
    return parser


def _floor(image: str, command: list[str], entrypoint: str | None = "python") -> tuple[list[float], list[float]]:
    """(StartedAt → FinishedAt, docker run → FinishedAt) in ms, `_FLOOR_RUNS` times after a warm-up."""
    engine, from_run = [], []
    for index in range(_FLOOR_RUNS + 1):
        name = f"restbench-{uuid.uuid4().hex[:12]}"
        args = ["docker", "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
        if entrypoint:
            args += ["--entrypoint", entrypoint]
        called = time.time()
        subprocess.run([*args, image, *command], capture_output=True, check=True)
        subprocess.run(["docker", "wait", name], capture_output=True, check=True)
        inspected = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.StartedAt}} {{.State.FinishedAt}}", name],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        subprocess.run(["docker", "rm", name], capture_output=True, check=False)
        started, finished = (_engine_time(stamp) for stamp in inspected)
        if index > 0:
            engine.append((finished - started) * 1000)
            from_run.append((finished - called) * 1000)
    return engine, from_run


def _engine_time(stamp: str) -> float:
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(seconds + "+00:00").timestamp() + float("0." + (fraction or "0"))


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(values):6.0f} ms, p90 {p90:6.0f} ms"


def _started_at(container: str) -> float:
    inspected = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.StartedAt}}", container], capture_output=True, text=True, check=False
    )
    return _engine_time(inspected.stdout.strip()) if inspected.returncode == 0 else 0.0


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class DaemonFleet:
    """The workerctl daemon with `size` enabled workers, on a database of its own."""

    def __init__(self, binary: str, image: str, amqp_url: str, size: int, broker_pid: int | None = None) -> None:
        self.binary = binary
        self.broker_pid = broker_pid
        self.image = image
        self.amqp_url = amqp_url
        self.size = size
        self.tag = uuid.uuid4().hex[:10]
        self.instance = f"restbench{self.tag}"
        self.exchange = f"restbench.{self.tag}"
        admin = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
        self.admin_url = admin
        self.db_name = f"restbench_{self.tag}"
        self.db_url = urllib.parse.urlsplit(admin)._replace(path=f"/{self.db_name}").geturl()
        self.worker_ids = [str(uuid.uuid4()) for _ in range(size)]

    def measure(self, seconds: float, settle: float) -> tuple[Idle, Idle]:
        """(the machine without daemon or workers, the fleet under the daemon), `seconds` each."""
        background = measure_fleet([], seconds, broker=self.broker_pid)
        self._psql(self.admin_url, f'CREATE DATABASE "{self.db_name}"')
        daemon: subprocess.Popen[bytes] | None = None
        try:
            daemon = self._start_daemon()
            self._wait_for(lambda: self._psql(self.db_url, "SELECT 1 FROM _sqlx_migrations LIMIT 1", check=False) == "1", daemon)
            self._insert_workers()
            ready = f"SELECT count(*) FROM user_workers WHERE status = 'ready'"
            self._wait_for(lambda: self._psql(self.db_url, ready) == str(self.size), daemon, timeout=300.0)
            time.sleep(settle)
            containers = self._containers()
            assert len(containers) == self.size, f"{len(containers)} containers for {self.size} workers"
            window = time.time()
            idle = measure_fleet(containers, seconds, pid=daemon.pid, broker=self.broker_pid)
            after = self._containers()
            young = sum(1 for c in after if _started_at(c) > window - 60.0)
            if young or set(after) != set(containers):
                print(
                    f"  note: {len(set(after) - set(containers))} containers replaced during the window, {young}"
                    " started less than 60 s before its start (ready reports still repeating): not at rest",
                    flush=True,
                )
            return background, idle
        finally:
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            self._clean_up()

    def _start_daemon(self, log: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """The daemon, its log (stderr) to `log` (else this process's)."""
        port = _free_port()
        env = {
            **os.environ,
            "WORKERCTL_DATABASE_URL": self.db_url,
            "WORKERCTL_INSTANCE": self.instance,
            "WORKERCTL_DOCKER__IMAGE": self.image,
            "WORKERCTL_DOCKER__NETWORK": "host",
            "WORKERCTL_AMQP__URL": self.amqp_url,
            "WORKERCTL_AMQP__EXCHANGE": self.exchange,
            "WORKERCTL_CODE_SERVER__LISTEN": f"127.0.0.1:{port}",
            "WORKERCTL_CODE_SERVER__PUBLIC_URL": f"http://127.0.0.1:{port}",
            # Warnings only, and without lapin's line for each channel the broker
            # closes (the daemon's default filter leaves them out too).
            "WORKERCTL_LOG__FILTER": os.environ.get("RUST_LOG", "warn,lapin::channel=off"),
        }
        env.pop("WORKERCTL_CONFIG", None)
        return subprocess.Popen([self.binary, "run"], env=env, stdout=subprocess.DEVNULL, stderr=log)

    def _insert_workers(self) -> None:
        archive = base64.b64encode(_sensorbucket_zip(TRIVIAL_CODE)).decode()
        values = ",\n".join(
            f"('{worker_id}', 'idle-{n}', 'enabled', 'python', 1, 'unknown', decode('{archive}', 'base64'))"
            for n, worker_id in enumerate(self.worker_ids)
        )
        self._psql(
            self.db_url,
            f"INSERT INTO user_workers (id, name, state, language, revision, status, source) VALUES {values}",
        )

    def _containers(self) -> list[str]:
        listed = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc", "--filter", f"label=workerctl.instance={self.instance}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return listed.stdout.split()

    def _wait_for(self, done: object, daemon: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        assert callable(done)
        deadline = time.monotonic() + timeout
        while not done():
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done within {timeout:.0f} s")
            time.sleep(0.5)

    def _clean_up(self) -> None:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=workerctl.instance={self.instance}"],
            capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
        self._psql(self.admin_url, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)', check=False)
        queues = StartBench(self.amqp_url, DEFAULT_API, "report")
        queues.exchange = self.exchange
        for worker_id in self.worker_ids:
            queues.forget_queue(worker_id)
        queues.close()

    @staticmethod
    def _psql(url: str, sql: str, check: bool = True) -> str:
        done = subprocess.run(["psql", url, "-XtAq", "-c", sql], capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
