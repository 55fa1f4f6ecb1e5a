"""Where the time of a save goes: one worker under the daemon, saved N times.

Owns: nothing the runtime uses. Runs the workerctl binary (`--daemon`) on a
throwaway database with its debug log in JSON, one enabled worker on the
worker image, and for each save (`UPDATE user_workers SET source = …,
revision = revision + 1`, as the dashboard saves) publishes a message every
20 ms until the first result stamped with the new version comes back. Then
it lines up, on one clock (this host's; the engine's and the containers'
timestamps are the same clock here), from the UPDATE returning:

- `woken`: the daemon's control loop woken by the change (its NOTIFY);
- `created`, `started`: the new container's `Created` and `State.StartedAt`;
- `starting`, `code_loaded`, `consuming`: the dockerworker's own log events
  (`starting` is written once its imports are done, before the code GET);
- `answered`: the first result of the new code arriving here.

    python -m dockerworker.tools.savetrace --daemon target/release/workerctl [--saves 10]

Prints each save's steps and the median of each. Needs what restbench needs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import threading
import time
import uuid
from typing import Any

import pika

from .restbench import DaemonFleet, _engine_time
from .startbench import DEFAULT_AMQP_URL, _sensorbucket_zip

STEPS = ("woken", "created", "started", "starting", "code_loaded", "consuming", "answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dockerworker.tools.savetrace")
    parser.add_argument("--daemon", required=True)
    parser.add_argument("--image", default="workerctl/dockerworker:latest")
    parser.add_argument("--saves", type=int, default=10)
    args = parser.parse_args(argv)
    trace = SaveTrace(args.daemon, args.image, os.environ.get("AMQP_URL", DEFAULT_AMQP_URL))
    rows = trace.run(args.saves)
    print("ms after the UPDATE returned: " + "  ".join(f"{s:>11s}" for s in STEPS))
    for row in rows:
        print("                              " + "  ".join(f"{row.get(s, float('nan')):11.0f}" for s in STEPS))
    medians = [statistics.median(r[s] for r in rows if s in r) for s in STEPS]
    print("median                        " + "  ".join(f"{m:11.0f}" for m in medians))
    return 0


def _versioned(version: int) -> str:
    return f'def process(msg):\n    msg.metadata["version"] = {version}\n    return msg\n'


class SaveTrace(DaemonFleet):
    def __init__(self, binary: str, image: str, amqp_url: str) -> None:
        super().__init__(binary, image, amqp_url, 1)
        self.log_path = f"/tmp/savetrace-{self.tag}.log"

    def run(self, saves: int) -> list[dict[str, float]]:
        self._psql(self.admin_url, f'CREATE DATABASE "{self.db_name}"')
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed in finally)
        daemon: subprocess.Popen[bytes] | None = None
        connection = None
        try:
            os.environ["RUST_LOG"] = "workerctl=debug"
            os.environ["WORKERCTL_LOG__FORMAT"] = "json"
            daemon = self._start_daemon(log)
            self._wait_for(lambda: self._psql(self.db_url, "SELECT 1 FROM _sqlx_migrations LIMIT 1", check=False) == "1", daemon)
            worker = self.worker_ids[0]
            self._save(worker, 0, insert=True)
            ready = "SELECT count(*) FROM user_workers WHERE status = 'ready'"
            self._wait_for(lambda: self._psql(self.db_url, ready) == "1", daemon, timeout=120.0)
            connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            channel = connection.channel()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            next_key = f"savetrace-next-{self.tag}"
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, self.exchange, next_key)
            rows = []
            for version in range(1, saves + 1):
                time.sleep(3.0)  # the old revision retired; the daemon at rest
                rows.append(self._one(worker, version, channel, queue, next_key))
            return rows
        finally:
            if connection is not None:
                connection.close()
            if daemon is not None:
                daemon.terminate()
                daemon.wait(timeout=30)
            log.close()
            self._clean_up()

    def _save(self, worker: str, version: int, insert: bool = False) -> None:
        archive = base64.b64encode(_sensorbucket_zip(_versioned(version))).decode()
        if insert:
            self._psql(
                self.db_url,
                "INSERT INTO user_workers (id, name, state, language, revision, status, source) VALUES "
                f"('{worker}', 'traced', 'enabled', 'python', 1, 'unknown', decode('{archive}', 'base64'))",
            )
        else:
            self._psql(
                self.db_url,
                f"UPDATE user_workers SET source = decode('{archive}', 'base64'), revision = revision + 1"
                f" WHERE id = '{worker}'",
            )

    def _one(self, worker: str, version: int, channel: Any, queue: str, next_key: str) -> dict[str, float]:
        body = json.dumps(
            {
                "tracing_id": str(uuid.uuid4()), "tenant_id": 1, "access_token": "t", "received_at": 0,
                "pipeline_id": str(uuid.uuid4()), "step_index": 0, "pipeline_steps": [worker, next_key],
                "timestamp": 0, "payload": base64.b64encode(b"reading").decode(), "metadata": {},
            }
        ).encode()  # fmt: skip
        before = set(self._containers())
        log_offset = os.path.getsize(self.log_path)
        stop = threading.Event()
        publisher = threading.Thread(target=self._publish_every, args=(worker, body, stop), daemon=True)
        self._save(worker, version)
        saved = time.time()
        publisher.start()
        answered = None
        try:
            while answered is None:
                for _method, _props, got in channel.consume(queue, inactivity_timeout=0.005, auto_ack=True):
                    if got is not None and json.loads(got).get("metadata", {}).get("version") == version:
                        answered = time.time()
                        break
                    if got is None and time.time() - saved > 60:
                        raise RuntimeError("no answer from the new code within 60 s")
                    if got is None:
                        break
        finally:
            stop.set()
            publisher.join()
            channel.cancel()
        new = [c for c in self._containers() if c not in before]
        row = {"answered": answered}
        row.update(self._daemon_marks(log_offset, saved))
        if new:
            row.update(self._container_marks(new[0]))
        return {k: (v - saved) * 1000 for k, v in row.items() if v is not None}

    def _publish_every(self, worker: str, body: bytes, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        while not stop.is_set():
            channel.basic_publish(self.exchange, worker, body)
            stop.wait(0.02)
        connection.close()

    def _daemon_marks(self, offset: int, saved: float) -> dict[str, float]:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "woken by a change" in json.dumps(entry.get("fields", {})):
                at = _engine_time(entry["timestamp"])
                if at >= saved - 0.5:
                    return {"woken": at}
        return {}

    def _container_marks(self, container: str) -> dict[str, float]:
        inspected = subprocess.run(
            ["docker", "inspect", "--format", "{{.Created}} {{.State.StartedAt}}", container],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        marks = {"created": _engine_time(inspected[0]), "started": _engine_time(inspected[1])}
        logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, check=False)
        for line in (logs.stdout + logs.stderr).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") in ("starting", "code_loaded", "consuming") and entry["event"] not in marks:
                marks[entry["event"]] = _engine_time(entry["ts"])
        return marks


if __name__ == "__main__":
    raise SystemExit(main())
