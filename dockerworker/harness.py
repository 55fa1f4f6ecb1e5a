"""The local harness: `python -m dockerworker run-once --code PATH --message FILE`.

Owns: running one message through user code without a broker, for users
testing their code and for test suites. It uses the same `processing.handle`
as the container, so what it prints is what the container would publish.

Output: one JSON object on stdout, `{"outcome", "routing_key", "body"}`
(`body` is the JSON that would be published); everything else (what user code
printed, log lines) goes to stderr. Exit status: 0 when the message would go
to the next step, 1 when it would go to `errors`, 2 for bad arguments, 4 when
the code cannot be loaded.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, TextIO

from . import codeload, logs, processing
from .config import DEFAULT_ENTRYPOINT, Limits

EXIT_FORWARDED = 0
EXIT_ERRORS = 1
EXIT_USAGE = 2
EXIT_CODE_INVALID = 4


@dataclass(frozen=True)
class RunOnce:
    """The harness's inputs, as the CLI parsed them."""

    code: str
    message: str  # a file path, or "-" for stdin
    entrypoint: str = DEFAULT_ENTRYPOINT
    devices_endpoint: str | None = None
    worker_id: str = "00000000-0000-0000-0000-000000000000"


def run_once(args: RunOnce, stdout: TextIO | None = None) -> int:
    """Load the code, process the message, print the result; return the exit status."""
    stdout = stdout or sys.stdout
    logs.setup(stream=sys.stderr)
    try:
        body = _read_message(args.message)
    except OSError as exc:
        logs.event("message_unreadable", level=logging.ERROR, error=str(exc))
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="dockerworker-") as work_dir:
        try:
            code = codeload.load_path(args.code, args.entrypoint, Limits(), work_dir)
        except (codeload.CodeInvalid, OSError) as exc:
            logs.event("code_invalid", level=logging.ERROR, error=str(exc))
            return EXIT_CODE_INVALID
        outcome = processing.handle(body, {}, code.function, _context(args))
    _report(outcome, stdout)
    return EXIT_ERRORS if outcome.is_error else EXIT_FORWARDED


def _context(args: RunOnce) -> processing.Context:
    worker_id = str(uuid.UUID(args.worker_id))
    # One attempt: with no broker there is no later; a failure that may
    # pass is shown as the dead-letter the container would end with.
    return processing.Context(
        worker_id=worker_id,
        queue=f"worker_{worker_id}",
        max_attempts=1,
        max_redeliveries=1,
        devices_endpoint=args.devices_endpoint,
    )


def _read_message(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as file:
        return file.read()


def _report(outcome: processing.Outcome, stdout: TextIO) -> None:
    if outcome.output:
        sys.stderr.write(outcome.output if outcome.output.endswith("\n") else outcome.output + "\n")
    result: dict[str, Any] = {
        "outcome": outcome.verdict,
        "routing_key": outcome.routing_key,
        "body": json.loads(outcome.body),
    }
    stdout.write(json.dumps(result, indent=2) + "\n")
    stdout.flush()
