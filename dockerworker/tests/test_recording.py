"""Recording: the bounded record of settled inputs, its batches, and the pump sending them.

The pump runs against the scripted outlet of test_pump; the broker side of
a batch (workerctl's tap and its reader) is tested in workerctl's
tests/record.rs against a real broker.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from dockerworker import pump as pump_module
from dockerworker import recording
from dockerworker.amqp import Delivery
from dockerworker.codeload import UserCode
from dockerworker.config import Config, ConfigError, load
from dockerworker.pump import Pump, Stats
from dockerworker.reactor import Reactor
from dockerworker.recording import BATCH_HEADER, Recorder
from dockerworker.userthread import UserThread

from .support import pipeline_message
from .test_pump import WORKER_ID, ScriptedOutlet, identity, pumping, until


def records_of(batch: bytes | None) -> list[dict[str, Any]]:
    assert batch is not None
    document = orjson.loads(batch)
    assert document["worker"] == WORKER_ID
    records: list[dict[str, Any]] = document["records"]
    return records


def test_a_batch_holds_what_was_not_sent_yet_oldest_first_and_at_most_keep():
    recorder = Recorder(WORKER_ID, keep=3)
    assert recorder.batch() is None, "nothing recorded: no batch"
    for n in range(5):
        recorder.add(WORKER_ID, f"m-{n}", f"in-{n}".encode(), {}, ("next", f"out-{n}".encode()))
    records = records_of(recorder.batch())
    assert [r["message_id"] for r in records] == ["m-2", "m-3", "m-4"]
    assert base64.b64decode(records[0]["body"]) == b"in-2"
    assert records[0]["output"]["routing_key"] == "next"
    assert base64.b64decode(records[0]["output"]["body"]) == b"out-2"
    assert recorder.batch() is None, "each record is sent once"
    keys = [r["key"] for r in records]
    assert len(set(keys)) == 3 and all(k.endswith(f"-{n}") for k, n in zip(keys, (3, 4, 5))), keys
    assert Recorder(WORKER_ID, keep=3)._process != recorder._process  # noqa: SLF001 (one per process)
    recorder.add(WORKER_ID, "m-5", b"in-5", {}, None)
    [record] = records_of(recorder.batch())
    assert (record["message_id"], record["output"]) == ("m-5", None)


def test_large_messages_are_kept_within_the_byte_bound_newest_first():
    recorder = Recorder(WORKER_ID, keep=100, max_bytes=2500)
    for n in range(5):
        recorder.add(WORKER_ID, f"m-{n}", b"x" * 1000, {}, None)
    records = records_of(recorder.batch())
    assert [r["message_id"] for r in records] == ["m-3", "m-4"], "the oldest went first"
    recorder.add(WORKER_ID, "huge", b"x" * 10_000, {}, None)
    [record] = records_of(recorder.batch())
    assert record["message_id"] == "huge", "one record is kept even beyond the bound"


@pytest.mark.parametrize(
    ("headers", "published"),
    [
        ({"timestamp": 1_700_000_000_000}, True),
        ({"timestamp": True}, False),
        ({"timestamp": "1700000000000"}, False),
        ({"timestamp": -5}, False),
        ({}, False),
    ],
)
def test_an_input_arrived_when_its_publisher_says_else_when_it_was_settled(
    headers: dict[str, Any], published: bool
) -> None:
    recorder = Recorder(WORKER_ID, keep=1)
    recorder.add(WORKER_ID, None, b"{}", headers, None)
    [record] = records_of(recorder.batch())
    assert (record["received_ms"] == 1_700_000_000_000) == published
    assert isinstance(record["received_ms"], int) and record["received_ms"] > 0


def test_workerctl_turns_recording_on_with_the_number_to_keep():
    base = {"WORKER_ID": WORKER_ID, "AMQP_HOST": "amqp://mq", "CODE_URL": "http://code"}
    assert load(base).record_keep == 0
    assert load({**base, "WORKER_RECORD_KEEP": "200"}).record_keep == 200
    with pytest.raises(ConfigError, match="WORKER_RECORD_KEEP"):
        load({**base, "WORKER_RECORD_KEEP": "lots"})


def recording_pump(keep: int) -> Pump:
    config = Config(
        worker_id=WORKER_ID, amqp_url="amqp://unused", exchange="pipeline.messages", code_url=None, record_keep=keep
    )
    code = UserCode(identity, "usercode", "process", Path("/nonexistent"))
    return Pump(config, code, UserThread(), Stats(), Reactor(), Recorder(WORKER_ID, keep))


def test_the_pump_sends_each_settled_input_with_its_output_in_one_batch_and_then_rests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pump_module, "FLUSH_S", 0.01)

    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        for tag in (1, 2):
            body = json.dumps(pipeline_message(tracing_id=f"t-{tag}")).encode()
            pump.on_delivery(Delivery(tag, body, f"m-{tag}", "application/json", {}, WORKER_ID))
        until(pump, lambda: len(outlet.published) == 2, "both results")
        assert outlet.published[0].routing_key == "next"
        pump.on_confirm(2, multiple=True, acked=True)
        until(pump, lambda: len(outlet.published) == 3, "the batch")

        batch = outlet.published[2]
        assert (batch.exchange, batch.routing_key) == ("", recording.queue_of(WORKER_ID))
        assert batch.headers == {BATCH_HEADER: 1}
        assert not batch.mandatory, "no queue (workerctl not recording): the broker drops it"
        records = records_of(batch.body)
        assert [r["message_id"] for r in records] == ["m-1", "m-2"]
        assert records[0]["routing_key"] == WORKER_ID
        assert base64.b64decode(records[1]["output"]["body"]) == outlet.published[1].body
        assert records[1]["output"]["routing_key"] == "next"

        # The batch's own confirm settles nothing; no timer is left at rest.
        pump.on_confirm(3, multiple=False, acked=True)
        assert outlet.acks == [(2, True)]
        assert pump.ledger.awaiting_confirm == 0
        assert not pump._records_scheduled  # noqa: SLF001 (the timer is the point)

    pumping(test, recording_pump(keep=10))


def settle_one_then_stop(pump: Pump, outlet: ScriptedOutlet) -> None:
    """One message through (result published, confirmed, input acked), then the stop's wait for confirms."""
    pump.on_delivery(Delivery(1, json.dumps(pipeline_message()).encode(), "m-1", None, {}, WORKER_ID))
    until(pump, lambda: len(outlet.published) == 1, "the result")
    pump.on_confirm(1, multiple=False, acked=True)
    until(pump, lambda: outlet.acks != [], "the ack")
    pump.wait_confirms(0.1)


def test_a_pump_that_does_not_record_sends_no_batch() -> None:
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        settle_one_then_stop(pump, outlet)
        assert [p.routing_key for p in outlet.published] == ["next"]

    pumping(test)


def test_a_stop_sends_what_was_not_sent_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pump_module, "FLUSH_S", 3600.0)

    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        # The timer would wait an hour: the stop's wait for confirms sends it.
        settle_one_then_stop(pump, outlet)
        assert [p.routing_key for p in outlet.published] == ["next", recording.queue_of(WORKER_ID)]

    pumping(test, recording_pump(keep=10))
