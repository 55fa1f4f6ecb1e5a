"""Idle benchmark: what N ready workers cost while nothing happens.

Owns: nothing the runtime uses. It starts N containers of a worker image the
way workerctl starts them (the flags of `startbench`), each with a trivial
`process` and its own queue, waits until every one has sent its ready report
(it consumes), lets them settle, and then, over a window of nothing (30 s by
default), reads:

- the CPU time of the containers' own cgroups (cpuacct), summed: what the
  workers themselves cost, health checks run inside them included;
- the CPU time of the engine (dockerd, containerd and the shims, with the
  processes they reaped: every health check's runc);
- the CPU time of one more process, with `--pid` (the workerctl daemon);
- the whole machine (/proc/stat), which includes the broker, the database and
  whatever else runs: the load average is printed beside it;
- the same CPU split by process (`/proc/<pid>/stat`, each process's own time
  and its reaped children's): the engine, the broker (RabbitMQ's Erlang VM and
  its helpers), the database (every `postgres` process), the daemon, this
  benchmark, and the rest of the machine (other people's builds);
- the memory of each container (cgroup `memory.usage_in_bytes` less its page
  cache), median over the fleet.

    python -m dockerworker.tools.idlebench [--image IMAGE ...] [--workers 10,50]
                                     [--seconds 30] [--settle 10]

With several images the fleets are measured one after the other, in the order
given, for each size. `measure_fleet` reads containers that someone else
started (the daemon's, in scripts/bench), selected by a label.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .startbench import (
    DEFAULT_AMQP_URL,
    DEFAULT_API,
    TRIVIAL_CODE,
    StartBench,
    _code_answer,
    _docker_run,
    _free_port,
    _HttpServer,
    _sensorbucket_zip,
)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_ENGINE = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc", "docker-proxy")
_BROKER = ("beam.smp", "epmd", "erl_child_setup", "inet_gethost", "rabbitmq-server")
_DATABASE = ("postgres",)
# The groups of `Idle.groups`, in the order printed. "other" is the machine
# less everything named (other people's work, the kernel's threads).
GROUPS = ("engine", "broker", "database", "daemon", "bench", "other")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    images: list[str] = args.image or ["workerctl/dockerworker:latest"]
    sizes = [int(n) for n in args.workers.split(",")]
    for size in sizes:
        for image in images:
            print(run_fleet(image, size, args.seconds, args.settle, args.amqp_url, args.api).line(image), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.tools.idlebench")
    parser.add_argument("--image", action="append", help="a worker image (repeatable)")
    parser.add_argument("--workers", default="10,50", help="fleet sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0, help="the measured window")
    parser.add_argument("--settle", type=float, default=10.0, help="wait this long after the last ready report")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--api", default=DEFAULT_API, help="RabbitMQ management API, for the clean-up")
    return parser


@dataclass
class Idle:
    workers: int
    seconds: float
    containers_cpu: float  # fraction of one core, all containers together
    engine_cpu: float
    machine_cpu: float
    memory_mib: float  # median per container
    pid_cpu: float | None
    load: str
    groups: dict[str, float]  # fraction of one core per group of processes (GROUPS), from /proc

    def line(self, label: str) -> str:
        pid = f"  daemon {self.pid_cpu * 100:5.2f} %" if self.pid_cpu is not None else ""
        each = f" ({self.containers_cpu * 100 / self.workers:.3f} % each)" if self.workers else ""
        memory = f"  memory {self.memory_mib:.1f} MiB per container" if self.workers else ""
        return (
            f"{label}  {self.workers:3d} idle workers, {self.seconds:.0f} s:  containers {self.containers_cpu * 100:5.2f} %"
            f" of a core{each}  engine {self.engine_cpu * 100:5.2f} %"
            f"{pid}  machine {self.machine_cpu * 100:5.1f} %{memory}"
            f"  (load {self.load})"
        )

    def split(self) -> str:
        """The machine's CPU by group of processes, in % of a core."""
        return "  ".join(f"{name} {self.groups.get(name, 0.0) * 100:5.2f}" for name in ("containers", *GROUPS))


def run_fleet(image: str, size: int, seconds: float, settle: float, amqp_url: str, api: str) -> Idle:
    """Start `size` workers of `image`, wait for all to be ready, measure, remove them."""
    bench = StartBench(amqp_url, api, "report")
    code = _HttpServer(_code_answer(_sensorbucket_zip(TRIVIAL_CODE)))
    label = f"workerctl-idlebench={uuid.uuid4().hex[:12]}"
    ids: list[str] = []
    try:
        tokens = []
        for _ in range(size):
            worker_id, token = str(uuid.uuid4()), uuid.uuid4().hex
            env = {
                "WORKER_ID": worker_id,
                "AMQP_HOST": amqp_url,
                "AMQP_XCHG": bench.exchange,
                "CODE_URL": f"{code.url}/{worker_id}/source",
                "WORKER_HEALTH_PORT": str(_free_port()),
                "WORKER_READY_URL": f"{bench.ready.url}/ready?token={token}",
            }
            ids.append(_docker_run(f"idlebench-{token[:12]}", image, env, extra=["--label", label]))
            tokens.append((token, worker_id))
        for token, worker_id in tokens:
            bench.ready.wait(token, lambda: False, timeout=120.0)
            bench.forget_queue(worker_id)
        time.sleep(settle)
        return measure_fleet(ids, seconds)
    finally:
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
        code.close()
        bench.close()


def measure_fleet(container_ids: list[str], seconds: float, pid: int | None = None, broker: int | None = None) -> Idle:
    """The CPU of the containers, the engine, `pid` and the machine over `seconds`, and memory per container.

    With `broker`, only that process (a broker of one's own) is the broker
    group; other brokers on the machine count as "other"."""
    before = _sample(container_ids, pid)
    before_procs = _processes(pid, broker)
    time.sleep(seconds)
    after_procs = _processes(pid, broker)
    after = _sample(container_ids, pid)
    elapsed = after.at - before.at
    memory = [m for m in (_memory_mib(c) for c in container_ids) if m is not None]
    return Idle(
        workers=len(container_ids),
        seconds=elapsed,
        containers_cpu=(after.containers - before.containers) / elapsed,
        engine_cpu=(after.engine - before.engine) / elapsed,
        machine_cpu=(after.machine - before.machine) / elapsed,
        memory_mib=statistics.median(memory) if memory else float("nan"),
        pid_cpu=(after.pid - before.pid) / elapsed if pid is not None else None,
        load=Path("/proc/loadavg").read_text().split(" ", 3)[0],
        groups=_groups(before_procs, after_procs, elapsed, after.containers - before.containers, after.machine - before.machine),
    )


def _processes(daemon: int | None, broker: int | None = None) -> dict[int, tuple[str, float]]:
    """Every process outside a container: pid → (group, own + reaped children's CPU s)."""
    found: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            if "/docker/" in (entry / "cgroup").read_text():
                continue  # a container's: counted by its cgroup
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        ppid = int(fields[1])
        cpu = sum(int(f) for f in fields[11:15]) / _CLOCK_TICKS
        if pid == daemon or ppid == daemon:
            group = "daemon"
        elif pid == me or ppid == me:
            group = "bench"
        elif comm in _ENGINE or comm.startswith("containerd-shim"):
            group = "engine"
        elif broker is not None and broker in (pid, ppid):
            group = "broker"
        elif comm in _BROKER and broker is None:
            group = "broker"
        elif comm in _DATABASE:
            group = "database"
        else:
            group = "other"
        found[pid] = (group, cpu)
    return found


def _groups(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    elapsed: float,
    containers: float,
    machine: float,
) -> dict[str, float]:
    """CPU per group over the window, as a fraction of one core.

    A process alive at both ends counts its difference, one born in the
    window all of its time; one that ended in the window counts in its
    parent's reaped children's time (when the parent waited for it). The
    health check's process is counted twice: in its container's cgroup and in
    the shim that reaped it. "other" is the machine less the named groups.
    """
    spent = dict.fromkeys(("containers", *GROUPS), 0.0)
    for pid, (group, cpu) in after.items():
        earlier = before.get(pid)
        spent[group] += cpu - (earlier[1] if earlier is not None and earlier[0] == group else 0.0)
    spent["containers"] = containers
    spent["other"] = machine - sum(v for k, v in spent.items() if k != "other")
    return {name: value / elapsed for name, value in spent.items()}


@dataclass
class _Sample:
    at: float
    containers: float
    engine: float
    machine: float
    pid: float


def _sample(container_ids: list[str], pid: int | None) -> _Sample:
    return _Sample(
        at=time.monotonic(),
        containers=sum(_container_cpu_s(c) for c in container_ids),
        engine=sum(_process_cpu_s(p, children=True) for p in _engine_pids()),
        machine=_machine_busy_s(),
        pid=_process_cpu_s(pid, children=True) if pid is not None else 0.0,
    )


def _container_cpu_s(container_id: str) -> float:
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat")
    for line in v2.read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    return 0.0


def _memory_mib(container_id: str) -> float | None:
    """Usage less page cache, as `docker stats` shows it (cgroup v1)."""
    base = Path(f"/sys/fs/cgroup/memory/docker/{container_id}")
    try:
        usage = int((base / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        return (usage - int(stat.get("total_inactive_file", 0))) / 2**20
    except (OSError, ValueError):
        return None


def _engine_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in _ENGINE:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _process_cpu_s(pid: int, *, children: bool) -> float:
    """utime + stime (and, with `children`, of the children it waited for)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLOCK_TICKS


def _machine_busy_s() -> float:
    """All CPUs' busy time: user, nice, system, irq, softirq, steal."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


if __name__ == "__main__":
    raise SystemExit(main())
