"""The decision for one message, table by table, without a broker."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from dockerworker import processing
from dockerworker.devices import DevicesEndpointUnavailable, TransientFailure
from dockerworker.processing import Context, Verdict, handle

from .support import pipeline_message

CTX = Context(worker_id="w-1", queue="worker_w-1", max_attempts=3, max_redeliveries=5)


def run(function: Callable[[Any], Any], body: Any = None, headers: dict[str, Any] | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body if body is not None else pipeline_message()).encode()
    return handle(raw, headers or {}, function, CTX)


def identity(msg):
    return msg


def test_the_result_goes_to_the_next_step_with_step_index_advanced():
    outcome = run(identity, pipeline_message(pipeline_steps=["a", "b", "c"], step_index=1))

    assert (outcome.verdict, outcome.routing_key) == (Verdict.FORWARDED, "c")
    assert json.loads(outcome.body)["step_index"] == 2


def test_a_returned_dict_is_forwarded_too():
    def as_dict(msg):
        return {**pipeline_message(tracing_id="from-dict"), "extra": True}

    outcome = run(as_dict)

    assert outcome.routing_key == "next"
    body = json.loads(outcome.body)
    assert body["tracing_id"] == "from-dict" and body["step_index"] == 1 and body["extra"] is True


@pytest.mark.parametrize(
    "function, error",
    [
        (lambda msg: None, "must return the message"),
        (lambda msg: 42, "must return the message"),
        (lambda msg: {"not": "a message"}, "not a pipeline message"),
        (lambda msg: 1 / 0, "ZeroDivisionError"),
    ],
    ids=["none", "int", "bad-dict", "raises"],
)
def test_user_errors_go_to_errors_with_the_traceback(function, error):
    message = pipeline_message()

    outcome = run(function, message)

    assert (outcome.verdict, outcome.routing_key) == (Verdict.FAILED, "errors")
    body = json.loads(outcome.body)
    assert error in body["error"] and "Traceback" in body["error"]
    assert body["received_by_worker"] == message
    assert (body["worker"], body["queue"]) == ("w-1", "w-1")
    assert outcome.attempt == 1


def test_the_error_body_shows_the_message_as_user_code_left_it():
    def half_done(msg):
        msg.metadata["step"] = "halfway"
        raise ValueError("oops")

    body = json.loads(run(half_done).body)

    assert body["processing_attempt"]["metadata"] == {"step": "halfway"}
    assert body["received_by_worker"]["metadata"] == {}


def test_a_message_with_no_step_after_this_one_is_a_user_visible_error():
    outcome = run(identity, pipeline_message(pipeline_steps=["only"], step_index=0))

    assert outcome.routing_key == "errors"
    assert "no step at index 1" in json.loads(outcome.body)["error"]


def test_an_unserialisable_result_is_an_error_whose_body_still_serialises():
    def bad(msg):
        msg.metadata["obj"] = object()
        return msg

    outcome = run(bad)

    assert outcome.routing_key == "errors"
    body = json.loads(outcome.body)
    assert "not JSON serializable" in body["error"]
    assert body["processing_attempt"]["metadata"]["obj"].startswith("<object object")


def test_a_user_exit_is_a_failure_not_an_exit():
    def leaves(msg):
        raise SystemExit(1)

    assert run(leaves).verdict == Verdict.FAILED


@pytest.mark.parametrize("body", [b"\xff\xfe", b"{}", b'"string"'])
def test_poison_goes_to_errors_with_the_raw_body(body):
    outcome = run(identity, body)

    assert (outcome.verdict, outcome.routing_key) == (Verdict.POISON, "errors")
    assert json.loads(outcome.body)["processing_attempt"] is None


def test_a_timed_out_message_goes_to_errors_with_where_it_hung():
    message = pipeline_message()
    outcome = processing.timed_out(
        json.dumps(message).encode(), {"x-delivery-count": 1}, "process() did not return within 1s", "at line 3", CTX
    )

    assert (outcome.verdict, outcome.routing_key, outcome.attempt) == (Verdict.TIMED_OUT, "errors", 2)
    body = json.loads(outcome.body)
    assert body["received_by_worker"] == message
    assert body["error"] == "process() did not return within 1s\nat line 3"
    assert outcome.tracing_id == message["tracing_id"]


def test_a_transient_failure_asks_for_a_retry_while_attempts_remain():
    def flaky(msg):
        raise DevicesEndpointUnavailable("down")

    first = run(flaky)
    last = run(flaky, headers={processing.ATTEMPT_HEADER: 3})

    assert (first.verdict, first.routing_key, first.attempt) == (Verdict.RETRY, None, 1)
    assert (last.verdict, last.routing_key) == (Verdict.DEAD_LETTERED, "errors")
    assert "gave up after 3 attempts" in json.loads(last.body)["error"]


def test_a_transient_failure_wrapped_by_user_code_is_still_transient():
    def wraps(msg):
        try:
            raise TransientFailure("later")
        except TransientFailure as exc:
            raise RuntimeError("my own error") from exc

    assert run(wraps).verdict == Verdict.RETRY


def test_broker_redeliveries_count_as_attempts():
    assert processing.attempt_of({}) == 1
    assert processing.attempt_of({processing.ATTEMPT_HEADER: 2, "x-delivery-count": 1}) == 3
    assert processing.attempt_of({processing.ATTEMPT_HEADER: "junk"}) == 1


def test_a_message_redelivered_past_the_limit_is_dead_lettered_without_running_user_code():
    calls = []

    outcome = run(lambda msg: calls.append(msg), headers={"x-delivery-count": 5})

    assert outcome.verdict == Verdict.DEAD_LETTERED
    assert "redelivered 5 times" in json.loads(outcome.body)["error"]
    assert calls == []


def test_what_user_code_prints_is_captured_with_the_outcome(capsys):
    def chatty(msg):
        print("hello", msg.tracing_id)
        return msg

    outcome = run(chatty, pipeline_message(tracing_id="t-9"))

    assert outcome.output == "hello t-9\n"
    assert outcome.tracing_id == "t-9"


def _documented_error_fields() -> list[str]:
    """The field column of the table in docs/compatibility.md §4."""
    doc = (Path(__file__).parents[2] / "docs" / "compatibility.md").read_text()
    table = doc.split("<!-- errors-body-fields -->")[1].split("<!-- /errors-body-fields -->")[0]
    return re.findall(r"^\s*\| `(\w+)` \|", table, flags=re.MULTILINE)


def test_the_error_body_has_sensorbuckets_fields_in_its_order_as_documented():
    before = int(time.time())

    body = json.loads(run(lambda msg: 1 / 0).body)

    assert list(body) == _documented_error_fields() == list(processing.ERROR_FIELDS)
    # Seconds, as SensorBucket's wrapper writes them (not ms like the rest).
    assert isinstance(body["timestamp"], int) and before <= body["timestamp"] <= time.time()
    assert body["worker"] == body["queue"] == CTX.worker_id
