"""What happens to one message: the decision, without any messaging.

Owns: parse → `process(message)` → next step, and the verdict for every way
that can go wrong, returned as an `Outcome` value that says where the result
goes (the next step, `errors`, or the retry queue) and with what body.
Both the broker side (`pump`) and the local harness (`harness`) use it, so
`run-once` shows exactly what the container would publish.

Must not do: any AMQP; the only effects are the user's own (its prints are
captured, its `match_device` calls go out).

Verdicts (`Verdict`, also the `outcome` of a message's log line):
- forwarded: the result goes to `pipeline_steps[step_index + 1]`;
- failed: user code raised, returned something that is not a message, or the
  pipeline has no next step: an error body (docs/compatibility.md §4) to `errors`;
- poison: the body is not JSON or not a pipeline message: an error body to
  `errors`, never retried;
- retry: a failure that may pass (`TransientFailure`, e.g. the devices
  endpoint is down): the input is republished for a later attempt;
- dead_lettered: a retryable failure with no attempts left, or a message the
  broker keeps redelivering (the worker probably dies on it): to `errors`;
- timed_out: `process` did not return within the time allowed: to `errors`
  (decided by the pump, which watches the clock);
- unroutable, requeued: decided by the pump from the broker's answer to a
  publish (no queue bound for the next step; the publish to `errors` or to
  the retry queue failed, so the input goes back to the queue).
"""

from __future__ import annotations

import enum
import json
import time
import traceback
from typing import Any, Callable, Mapping, NamedTuple

from . import logs
from .config import ERRORS_ROUTING_KEY
from .devices import TransientFailure
from .message import (
    ErrMessageNoSteps,
    ErrUserCodeFailure,
    Message,
    PoisonMessage,
    Serializer,
    check_pipeline_fields,
    dumps,
    parse_json,
)

# Header carrying how many times this worker has tried the message; the
# retry path republishes with it incremented.
ATTEMPT_HEADER = "x-workerctl-attempt"
LAST_ERROR_HEADER = "x-workerctl-last-error"
# The fields of the body published to `errors`, in SensorBucket's wrapper's
# order (docs/compatibility.md §4 lists them; a test compares the two).
ERROR_FIELDS = ("received_by_worker", "processing_attempt", "worker", "queue", "timestamp", "error")
# Set by quorum queues on every redelivery of an unacknowledged message.
DELIVERY_COUNT_HEADER = "x-delivery-count"


class Verdict(enum.StrEnum):
    """What became of a message; the value is what its log line says."""

    FORWARDED = "forwarded"
    FAILED = "failed"
    POISON = "poison"
    RETRY = "retry"
    DEAD_LETTERED = "dead_lettered"
    TIMED_OUT = "timed_out"
    UNROUTABLE = "unroutable"
    REQUEUED = "requeued"


class Context(NamedTuple):
    """The fixed facts processing needs about this worker."""

    worker_id: str
    queue: str
    max_attempts: int
    max_redeliveries: int
    devices_endpoint: str | None = None


class Outcome(NamedTuple):
    """Where a processed message goes next, and why."""

    verdict: Verdict
    routing_key: str | None  # None for a retry: it goes to the retry queue
    body: bytes
    attempt: int
    tracing_id: str | None = None
    error: str | None = None  # one line for the log; the full text is in the body
    output: str = ""  # what user code printed

    @property
    def is_error(self) -> bool:
        return self.routing_key == ERRORS_ROUTING_KEY

    def with_error(self, error: str) -> "Outcome":
        """The same outcome, with `error` as the reason in its log line."""
        return self._replace(error=error)


def attempt_of(headers: Mapping[str, Any]) -> int:
    """Which attempt this delivery is: 1 + retries so far + broker redeliveries."""
    return _int_header(headers, ATTEMPT_HEADER, 1) + redeliveries_of(headers)


def redeliveries_of(headers: Mapping[str, Any]) -> int:
    return _int_header(headers, DELIVERY_COUNT_HEADER, 0)


def handle(body: bytes, headers: Mapping[str, Any], function: Callable[[Any], Any], ctx: Context) -> Outcome:
    """Decide what becomes of one delivered message."""
    attempt = attempt_of(headers)
    try:
        data = parse_json(body)
        check_pipeline_fields(data)
        message = Message.from_dict(data, ctx.devices_endpoint)
    except PoisonMessage as exc:
        return _poison(body, exc, attempt, ctx)
    tracing_id = str(data.get("tracing_id"))
    if redeliveries_of(headers) >= ctx.max_redeliveries:
        reason = f"redelivered {redeliveries_of(headers)} times without being settled; the worker may be crashing on it"
        return _to_errors(Verdict.DEAD_LETTERED, data, message, reason, attempt, tracing_id, ctx, "")
    return _run_user_code(data, message, function, attempt, tracing_id, ctx)


def timed_out(body: bytes, headers: Mapping[str, Any], reason: str, where: str, ctx: Context) -> Outcome:
    """`process` has not returned within the time allowed: the error body for
    `errors`, with where its thread was, so the user sees what hung."""
    try:
        received: Any = parse_json(body)
    except PoisonMessage:
        received = body.decode("utf-8", errors="replace")
    attempt = attempt_of(headers)
    error_body = error_document(received, None, f"{reason}\n{where}", ctx)
    return Outcome(Verdict.TIMED_OUT, ERRORS_ROUTING_KEY, error_body, attempt, _tracing_id_of(body), error=reason)


def _run_user_code(
    data: dict[str, Any],
    message: Message,
    function: Callable[[Any], Any],
    attempt: int,
    tracing_id: str,
    ctx: Context,
) -> Outcome:
    with logs.capture() as captured:
        try:
            result = function(message)
            routing_key, body = _next_hop(result)
        except (Exception, SystemExit) as exc:
            output = captured.getvalue()
            if _is_transient(exc):
                return _transient(data, message, exc, attempt, tracing_id, ctx, output)
            return _to_errors(Verdict.FAILED, data, message, traceback.format_exc(), attempt, tracing_id, ctx, output)
    return Outcome(Verdict.FORWARDED, routing_key, body, attempt, tracing_id, output=captured.getvalue())


def _next_hop(result: Any) -> tuple[str, bytes]:
    """The routing key and body of what `process` returned."""
    if isinstance(result, Message):
        routing_key = result.next_step()
        return routing_key, dumps(result)
    if isinstance(result, dict):
        return _next_hop_of_dict(result)
    raise ErrUserCodeFailure(f"process must return the message (or a dict), got {type(result).__name__}")


def _next_hop_of_dict(result: dict[str, Any]) -> tuple[str, bytes]:
    try:
        check_pipeline_fields(result)
    except PoisonMessage as exc:
        raise ErrUserCodeFailure(f"process returned a dict that is not a pipeline message: {exc}") from None
    step_index = result["step_index"] + 1
    steps = result["pipeline_steps"]
    if step_index >= len(steps):
        raise ErrMessageNoSteps(f"pipeline message has no step at index {step_index} (steps: {steps})")
    result["step_index"] = step_index
    return steps[step_index], dumps(result)


def _transient(
    data: dict[str, Any],
    message: Message,
    exc: BaseException,
    attempt: int,
    tracing_id: str,
    ctx: Context,
    output: str,
) -> Outcome:
    if attempt >= ctx.max_attempts:
        reason = f"gave up after {attempt} attempts; last failure:\n{traceback.format_exc()}"
        return _to_errors(Verdict.DEAD_LETTERED, data, message, reason, attempt, tracing_id, ctx, output)
    return Outcome(Verdict.RETRY, None, b"", attempt, tracing_id, error=_one_line(exc), output=output)


def _poison(body: bytes, exc: PoisonMessage, attempt: int, ctx: Context) -> Outcome:
    received = body.decode("utf-8", errors="replace")
    tracing_id = _tracing_id_of(body)
    error_body = error_document(received, None, str(exc), ctx)
    return Outcome(Verdict.POISON, ERRORS_ROUTING_KEY, error_body, attempt, tracing_id, error=str(exc))


def _to_errors(
    verdict: Verdict,
    data: dict[str, Any],
    message: Message,
    error: str,
    attempt: int,
    tracing_id: str,
    ctx: Context,
    output: str,
) -> Outcome:
    body = error_document(data, message, error, ctx)
    return Outcome(verdict, ERRORS_ROUTING_KEY, body, attempt, tracing_id, error=_last_line(error), output=output)


def error_document(received: Any, attempted: Any, error: str, ctx: Context) -> bytes:
    """The body published to `errors`: SensorBucket's wrapper's, field for
    field (docs/compatibility.md §4, `ERROR_FIELDS`). `worker` and `queue` are
    both the worker's id, as production sets them, and `timestamp` is in Unix
    seconds, unlike every other timestamp of the pipeline. The attempt goes
    in the `x-workerctl-attempt` header instead (the pump sets it)."""
    document = {
        "received_by_worker": received,
        "processing_attempt": attempted,
        "worker": ctx.worker_id,
        "queue": ctx.worker_id,
        "timestamp": int(time.time()),
        "error": error,
    }
    try:
        return dumps(document)
    except (TypeError, ValueError):
        # The user left something unserialisable in the message; the error
        # must still get out, so show that part as its repr.
        return json.dumps(document, cls=_ReprSerializer, separators=(",", ":")).encode("utf-8")


class _ReprSerializer(Serializer):
    def default(self, obj: Any) -> Any:
        try:
            return super().default(obj)
        except TypeError:
            return repr(obj)


def _is_transient(exc: BaseException) -> bool:
    # User code may wrap our exception in its own; look down the chain.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TransientFailure):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _int_header(headers: Mapping[str, Any], name: str, default: int) -> int:
    try:
        return max(int(headers.get(name, default)), 0)
    except (TypeError, ValueError):
        return default


def _tracing_id_of(body: bytes) -> str | None:
    try:
        data = json.loads(body)
        return str(data["tracing_id"]) if isinstance(data, dict) and "tracing_id" in data else None
    except (ValueError, UnicodeDecodeError):
        return None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
