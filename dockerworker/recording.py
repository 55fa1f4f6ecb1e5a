"""Recording: the last `WORKER_RECORD_KEEP` messages this worker settled, and what each produced.

Owns: the bounded record of inputs and their outputs that workerctl's
`worker messages` and `worker try --last` read, and its batches. workerctl
keeps a worker's recent traffic in a bounded queue of its own,
`workerctl.record.<worker id>` (README, "Recording"). For an image that does
not record itself, the broker copies every message into it (a binding
beside the worker's queue): one more enqueue per message, which costs the
broker, and so the worker, a measurable share of its throughput at a few
thousand messages a second. The dockerworker records instead: each settled
input, with its arrival time and routing key and the output it produced
(next step or `errors`), is kept here in memory (a deque bounded at `keep`,
no copy of the bodies: the bytes the delivery brought), and at most once a
second, while messages come, the ones not sent yet go to that queue as
**one** message, a batch (through the default exchange; if the queue does
not exist, workerctl is not recording and the broker drops it). At rest
there is no timer and no batch; a stop sends what is left.

Architecture Invariant: nothing here is in a message's path. `add` appends a
tuple (the oldest go beyond `keep` records or `MAX_BYTES` of bodies); the batch is built and published on the event-loop thread at most
once a second, and only the newest `keep` records of it; a batch that cannot
be published is dropped (the recording is best-effort, the messages are
not).

Batch format (JSON, header `x-workerctl-records: 1`; workerctl's reader is
`src/recorder.rs`):
    {"worker": "<id>", "records": [
        {"key": "<process>-<n>", "received_ms": <epoch ms>, "routing_key": "...", "message_id": "..." | null,
         "body": "<base64>",
         "output": {"routing_key": "...", "body": "<base64>", "at_ms": <epoch ms>} | null}, ...]}
`received_ms` is the `timestamp` header the publisher set, if it did, else
the time the input was settled; records are oldest first.
"""

from __future__ import annotations

import base64
import os
import time
from collections import deque
from typing import Any, NamedTuple

import orjson

# The header that tells workerctl's reader a message of the recording queue
# is a batch of records, not a copy of a pipeline message.
BATCH_HEADER = "x-workerctl-records"
# How long records wait before they are sent, at most.
FLUSH_S = 1.0
# The most body bytes (inputs and outputs) kept: beyond it the oldest
# records go first, whatever `keep` says, so that a worker of large
# messages does not spend its memory on its recording.
MAX_BYTES = 8 * 1024 * 1024


def queue_of(worker_id: str) -> str:
    """The recording queue workerctl reads for a worker."""
    return f"workerctl.record.{worker_id}"


class Record(NamedTuple):
    key: str
    received_ms: int
    routing_key: str
    message_id: str | None
    body: bytes
    output_key: str | None
    output_body: bytes | None
    at_ms: int


class Recorder:
    """The newest `keep` records (and at most `max_bytes` of bodies), and how
    many of them were not sent yet."""

    def __init__(self, worker_id: str, keep: int, max_bytes: int = MAX_BYTES) -> None:
        self.worker_id = worker_id
        self.keep = keep
        self.max_bytes = max_bytes
        self._records: deque[Record] = deque()
        self._bytes = 0
        self._unsent = 0
        # Each record's key: this process, and a number. workerctl stores a
        # record once by it, however often its batch is read.
        self._process = os.urandom(6).hex()
        self._numbered = 0

    @property
    def unsent(self) -> int:
        return self._unsent

    def add(
        self,
        routing_key: str,
        message_id: str | None,
        body: bytes,
        headers: dict[str, Any],
        output: tuple[str, bytes] | None,
    ) -> None:
        """One input settled: what it was, and what it produced (None: nothing yet, e.g. a retry)."""
        now_ms = int(time.time() * 1000)
        stamp = headers.get("timestamp") if headers else None
        received_ms = stamp if isinstance(stamp, int) and not isinstance(stamp, bool) and stamp > 0 else now_ms
        key, out = output if output is not None else (None, None)
        self._numbered += 1
        number = f"{self._process}-{self._numbered}"
        self._records.append(Record(number, received_ms, routing_key, message_id, body, key, out, now_ms))
        self._bytes += _size(body, out)
        while len(self._records) > self.keep or (self._bytes > self.max_bytes and len(self._records) > 1):
            dropped = self._records.popleft()
            self._bytes -= _size(dropped.body, dropped.output_body)
        self._unsent = min(self._unsent + 1, len(self._records))

    def batch(self) -> bytes | None:
        """The records not sent yet (the newest `keep` at most), as one batch; None if there are none."""
        if not self._unsent:
            return None
        records = list(self._records)[-self._unsent :]
        self._unsent = 0
        return orjson.dumps({"worker": self.worker_id, "records": [_document(r) for r in records]})


def _size(body: bytes, output: bytes | None) -> int:
    return len(body) + (len(output) if output is not None else 0)


def _document(record: Record) -> dict[str, Any]:
    output = None
    if record.output_key is not None and record.output_body is not None:
        output = {
            "routing_key": record.output_key,
            "body": base64.b64encode(record.output_body).decode("ascii"),
            "at_ms": record.at_ms,
        }
    return {
        "key": record.key,
        "received_ms": record.received_ms,
        "routing_key": record.routing_key,
        "message_id": record.message_id,
        "body": base64.b64encode(record.body).decode("ascii"),
        "output": output,
    }
