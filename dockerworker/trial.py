"""Try mode: `python -m dockerworker.trial` runs recorded messages through
two versions of a worker's code, with no broker, and prints what each made.

Owns: the one-shot protocol `workerctl worker try` speaks with a throwaway
container of the worker's image. A separate module, imported only in this
mode: a normal start (`python -m dockerworker`) never pays for it.

Input, one JSON object on stdin:
    {"entrypoint": "main.main", "worker_id": "<uuid>", "timeout_s": 10,
     "devices_endpoint": null,
     "codes": {"current": "<base64 zip>" | null, "candidate": "<base64 zip>"},
     "inputs": ["<base64 of a message body, as received>", ...]}
Output, one JSON object on stdout (logs and user prints go to stderr):
    {"runs": {"current": RUN, "candidate": RUN}}
    RUN = {"loaded": true, "error": null, "results": [RESULT, ...]}
        | {"loaded": false, "error": "<why the code does not load>", "results": []}
    RESULT = {"outcome": "forwarded" | "failed" | "poison" | ...,
              "routing_key": "<key>", "body": <the published JSON>,
              "error": "<traceback>" | null, "printed": "<what process printed>"}

Each message goes through `processing.handle`, the container's own path, so
the result is what the worker would publish; nothing is published. Each
code is loaded on its own, one after the other, in a fresh directory under
/tmp. One attempt per message, as `run-once` does. A `process` that does not
return within `timeout_s` raises `ProcessTimeout` into it and counts as
raising. Exit status: 0 when the report was written, 2 for unreadable input.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import tempfile
import uuid
from types import FrameType
from typing import Any, Callable, TextIO

from . import codeload, logs, processing
from .config import DEFAULT_ENTRYPOINT, Limits

EXIT_OK = 0
EXIT_USAGE = 2
CODE_NAMES = ("current", "candidate")


class ProcessTimeout(Exception):
    """`process` did not return within the time allowed for one message."""


def main(stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    logs.setup(stream=sys.stderr)
    try:
        request = json.loads((stdin or sys.stdin).read())
        inputs = [base64.b64decode(body) for body in request["inputs"]]
        codes = request["codes"]
        ctx = _context(str(request.get("worker_id") or uuid.UUID(int=0)), request.get("devices_endpoint"))
    except (ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"dockerworker.trial: unreadable request: {exc}\n")
        return EXIT_USAGE
    entrypoint = str(request.get("entrypoint") or DEFAULT_ENTRYPOINT)
    timeout_s = float(request.get("timeout_s") or 10)
    runs = {name: _run(codes.get(name), entrypoint, inputs, ctx, timeout_s) for name in CODE_NAMES}
    out = stdout or sys.stdout
    out.write(json.dumps({"runs": runs}) + "\n")
    out.flush()
    return EXIT_OK


def _context(worker_id: str, devices_endpoint: str | None) -> processing.Context:
    return processing.Context(
        worker_id=worker_id,
        queue=f"worker_{worker_id}",
        max_attempts=1,
        max_redeliveries=1 << 30,
        devices_endpoint=devices_endpoint,
    )


def _run(
    archive_b64: str | None, entrypoint: str, inputs: list[bytes], ctx: processing.Context, timeout_s: float
) -> dict[str, Any]:
    if archive_b64 is None:
        return {"loaded": False, "error": "no code", "results": []}
    with tempfile.TemporaryDirectory(prefix="trial-") as work_dir:
        try:
            code = codeload.load_archive(base64.b64decode(archive_b64), work_dir, entrypoint, Limits())
        except (codeload.CodeInvalid, OSError, ValueError) as exc:
            return {"loaded": False, "error": str(exc), "results": []}
        results = [_result(_handle(body, code.function, ctx, timeout_s)) for body in inputs]
    return {"loaded": True, "error": None, "results": results}


def _handle(
    body: bytes, function: Callable[[Any], Any], ctx: processing.Context, timeout_s: float
) -> processing.Outcome:
    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise ProcessTimeout(f"process did not return within {timeout_s:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return processing.handle(body, {}, function, ctx)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _result(outcome: processing.Outcome) -> dict[str, Any]:
    try:
        body: Any = json.loads(outcome.body) if outcome.body else None
    except ValueError:
        body = outcome.body.decode("utf-8", errors="replace")
    error = body.get("error") if outcome.is_error and isinstance(body, dict) else None
    return {
        "outcome": str(outcome.verdict),
        "routing_key": outcome.routing_key,
        "body": body,
        "error": error,
        "printed": outcome.output,
    }


if __name__ == "__main__":
    sys.exit(main())
