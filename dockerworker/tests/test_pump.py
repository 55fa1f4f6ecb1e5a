"""The pump with a scripted broker side: what is published, and when an input is acknowledged.

The outlet here records every publish, ack and nack; the test plays the
broker by calling the pump's listener methods (`on_confirm`, `on_return`,
`on_lost`) as the bridge would. User code runs on a real user thread.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from dockerworker import processing
from dockerworker.amqp import BrokerLost, Delivery, Unpublishable
from dockerworker.codeload import UserCode
from dockerworker.config import Config
from dockerworker.processing import Verdict
from dockerworker.pump import ProcessStuck, Pump, Stats
from dockerworker.reactor import Reactor
from dockerworker.userthread import UserThread

from .support import pipeline_message

WORKER_ID = "0b6f8f0e-5d4a-4a39-9a43-0c8f8c1e2a11"


@dataclass
class Published:
    seq: int
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    mandatory: bool
    expiration: str | None


@dataclass
class ScriptedOutlet:
    """Stands in for `amqp.Bridge`: numbers publishes like a confirm-mode channel."""

    published: list[Published] = field(default_factory=list)
    acks: list[tuple[int, bool]] = field(default_factory=list)
    nacks: list[int] = field(default_factory=list)
    refuse_publishes: bool = False
    # Routing keys AMQP could not carry: publishing to one raises Unpublishable.
    unencodable: set[str] = field(default_factory=set)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None,
        headers: dict[str, Any],
        mandatory: bool,
        content_type: str | None = "application/json",
        expiration: str | None = None,
    ) -> int:
        if self.refuse_publishes:
            raise BrokerLost("publish failed: the channel is closed")
        if routing_key in self.unencodable or ("x-unencodable" in headers and routing_key == "errors"):
            raise Unpublishable(f"cannot encode a publish with routing key {routing_key!r}")
        seq = len(self.published) + 1
        self.published.append(Published(seq, exchange, routing_key, body, headers, mandatory, expiration))
        return seq

    def ack(self, tag: int, *, multiple: bool) -> None:
        self.acks.append((tag, multiple))

    def nack(self, tag: int) -> None:
        self.nacks.append(tag)


def identity(msg: Any) -> Any:
    return msg


def delivery(tag: int, **overrides: Any) -> Delivery:
    body = json.dumps(pipeline_message(**overrides)).encode()
    return Delivery(tag, body, f"m-{tag}", "application/json", {})


def make_pump(function: Callable[[Any], Any] = identity, **config: Any) -> Pump:
    settings: dict[str, Any] = dict(
        worker_id=WORKER_ID, amqp_url="amqp://unused", exchange="pipeline.messages", code_url=None
    )
    settings.update(config)
    code = UserCode(function, "usercode", "process", Path("/nonexistent"))
    return Pump(Config(**settings), code, UserThread(), Stats(), Reactor())


def until(pump: Pump, condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Run the pump's reactor until `condition` holds; it is checked at least
    every 2 ms, since the user thread changes some of what it reads."""
    deadline = time.monotonic() + timeout
    while not pump.reactor.run_until(condition, 0.002):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def idle(pump: Pump, seconds: float) -> None:
    """Run the pump's reactor for `seconds`."""
    pump.reactor.run_until(lambda: False, seconds)


def pumping(test: Callable[[Pump, ScriptedOutlet], None], pump: Pump | None = None) -> None:
    """Run `test` with a pump that is running against a scripted outlet."""
    the_pump = pump or make_pump()
    outlet = ScriptedOutlet()
    the_pump.start(outlet)
    try:
        test(the_pump, outlet)
    finally:
        if not the_pump.finished:
            the_pump.on_lost(BrokerLost("test over"), expected=True)
        the_pump.reactor.close()


def test_an_input_is_acknowledged_only_after_the_confirm_of_its_result():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        pump.on_delivery(delivery(1))
        until(pump, lambda: len(outlet.published) == 1, "the result's publish")

        [result] = outlet.published
        assert (result.exchange, result.routing_key, result.mandatory) == ("pipeline.messages", "next", True)
        assert json.loads(result.body)["step_index"] == 1
        assert isinstance(result.headers["timestamp"], int)
        idle(pump, 0.05)
        assert outlet.acks == []

        pump.on_confirm(1, multiple=False, acked=True)
        until(pump, lambda: outlet.acks != [], "the ack")
        assert outlet.acks == [(1, True)]
        assert pump.stats.counts == {Verdict.FORWARDED: 1}

    pumping(test)


def test_acks_go_out_in_delivery_order_as_one_multiple_ack_per_run():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        for tag in (1, 2, 3):
            pump.on_delivery(delivery(tag))
        until(pump, lambda: len(outlet.published) == 3, "three publishes")

        pump.on_confirm(3, multiple=False, acked=True)  # the youngest first
        idle(pump, 0.02)
        assert outlet.acks == []
        pump.on_confirm(2, multiple=True, acked=True)
        until(pump, lambda: outlet.acks != [], "the ack")
        assert outlet.acks == [(3, True)]

    pumping(test)


def test_a_result_the_broker_refuses_goes_to_the_retry_queue_and_is_acked_after_that_confirm():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        pump.on_delivery(delivery(1))
        until(pump, lambda: len(outlet.published) == 1, "the result's publish")

        pump.on_confirm(1, multiple=False, acked=False)
        until(pump, lambda: len(outlet.published) == 2, "the retry publish")
        retry = outlet.published[1]
        assert (retry.exchange, retry.routing_key, retry.expiration) == ("", f"worker_{WORKER_ID}.retry", "5000")
        assert retry.headers[processing.ATTEMPT_HEADER] == 2
        assert "publish refused" in retry.headers[processing.LAST_ERROR_HEADER]
        assert outlet.acks == []

        pump.on_confirm(2, multiple=False, acked=True)
        until(pump, lambda: outlet.acks != [], "the ack")
        assert outlet.acks == [(1, True)]
        assert pump.stats.counts == {Verdict.RETRY: 1}

    pumping(test)


def test_a_returned_result_is_reported_on_errors_as_unroutable():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        pump.on_delivery(delivery(1, pipeline_steps=["me", "nobody-home"]))
        until(pump, lambda: len(outlet.published) == 1, "the result's publish")
        result = outlet.published[0]

        pump.on_return(result.routing_key, result.body)
        pump.on_confirm(1, multiple=False, acked=True)
        until(pump, lambda: len(outlet.published) == 2, "the error publish")
        error = outlet.published[1]
        assert (error.routing_key, error.mandatory) == ("errors", False)
        assert "nobody-home" in json.loads(error.body)["error"]
        assert outlet.acks == []

        pump.on_confirm(2, multiple=False, acked=True)
        until(pump, lambda: outlet.acks != [], "the ack")
        assert pump.stats.counts == {Verdict.UNROUTABLE: 1}

    pumping(test)


def test_an_error_publish_the_broker_refuses_hands_the_input_back():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        pump.on_delivery(delivery(1, pipeline_steps=["me", "nobody-home"]))
        until(pump, lambda: len(outlet.published) == 1, "the result's publish")
        pump.on_return(outlet.published[0].routing_key, outlet.published[0].body)
        pump.on_confirm(1, multiple=False, acked=True)
        until(pump, lambda: len(outlet.published) == 2, "the error publish")

        pump.on_confirm(2, multiple=False, acked=False)
        until(pump, lambda: outlet.nacks != [], "the nack")
        assert outlet.nacks == [1]
        assert pump.stats.counts == {Verdict.REQUEUED: 1}
        idle(pump, 0.02)
        assert outlet.acks == []  # the broker no longer knows tag 1: acking it would close the channel

    pumping(test)


def test_a_lost_connection_acknowledges_nothing_and_ends_the_pump():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        pump.on_delivery(delivery(1))
        until(pump, lambda: len(outlet.published) == 1, "the result's publish")

        pump.on_lost(BrokerLost("connection closed"), expected=False)
        pump.on_confirm(1, multiple=False, acked=True)  # too late: the broker requeued it
        idle(pump, 0.02)

        assert outlet.acks == []
        assert pump.stats.counts == {Verdict.REQUEUED: 1}

    pumping(test)


def test_a_publish_on_a_closed_channel_leaves_the_input_to_the_broker():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        outlet.refuse_publishes = True
        pump.on_delivery(delivery(1))
        until(pump, lambda: pump.stats.counts[Verdict.REQUEUED] == 1, "the requeued verdict")

        assert pump.ledger.awaiting_confirm == 0
        assert outlet.acks == []

    pumping(test)


def test_stop_finishes_what_is_in_hand_then_returns():
    release = threading.Event()

    def slow(msg: Any) -> Any:
        release.wait(5)
        return msg

    pump, outlet = make_pump(slow), ScriptedOutlet()
    pump.start(outlet)
    for tag in (1, 2):
        pump.on_delivery(delivery(tag))
    pump.stop(grace_s=5)
    release.set()
    until(pump, lambda: pump.finished, "the pump to finish")
    pump.finish()

    assert [p.routing_key for p in outlet.published] == ["next", "next"]
    pump.on_confirm(2, multiple=True, acked=True)
    pump.wait_confirms(1.0)
    assert outlet.acks == [(2, True)]


def test_a_process_that_hangs_goes_to_errors_and_ends_the_pump_with_process_stuck():
    hang = threading.Event()

    def hangs(msg: Any) -> Any:
        if msg.metadata.get("hang"):
            hang.wait(30)
        return msg

    pump, outlet = make_pump(hangs, process_timeout_s=0.2), ScriptedOutlet()
    pump.on_delivery(delivery(1))
    pump.on_delivery(delivery(2, metadata={"hang": True}))
    pump.on_delivery(delivery(3))
    pump.start(outlet)
    until(pump, lambda: pump.finished, "the watchdog to give up")
    with pytest.raises(ProcessStuck, match="did not return within 0.2s for message m-2"):
        pump.finish()
    hang.set()

    assert [p.routing_key for p in outlet.published] == ["next", "errors"]
    error = json.loads(outlet.published[1].body)
    assert error["received_by_worker"]["metadata"] == {"hang": True}
    assert pump.ledger.in_hand == 2  # message 3 is never taken: the broker requeues it


def test_an_idle_pump_sets_no_timer_and_its_watchdog_wakes_with_a_message():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        idle(pump, 0.01)  # the watchdog is waiting
        assert pump.reactor.timers() == 0, "nothing to watch: nothing scheduled"

        pump.on_delivery(delivery(1))
        until(pump, lambda: len(outlet.published) == 1, "the result's publish")
        pump.on_confirm(1, multiple=False, acked=True)
        until(pump, lambda: pump.handover.in_hand == 0, "the message settled")
        until(pump, lambda: pump.reactor.timers() == 0, "the watchdog asleep again", timeout=2.0)

    pumping(test, make_pump(process_timeout_s=60.0))


def test_the_messages_summary_waits_for_a_message_then_its_interval():
    from dockerworker import messaging

    reactor, stats = Reactor(), Stats()
    messaging._report(reactor, stats, 60.0)
    reactor.run_until(lambda: False, 0.01)
    assert reactor.timers() == 0, "an idle worker's summary sets no timer"
    stats.add(Verdict.FORWARDED)
    assert reactor.timers() == 1, "the interval starts with the first message"
    reactor.close()


def test_a_result_amqp_cannot_carry_goes_to_errors_with_the_reason_and_the_input_is_acked():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        long_key = "s" * 300
        outlet.unencodable.add(long_key)
        pump.on_delivery(delivery(1, pipeline_steps=["me", long_key]))
        until(pump, lambda: len(outlet.published) == 1, "the error publish")

        [error] = outlet.published
        assert (error.routing_key, error.mandatory) == ("errors", False)
        assert "cannot encode" in json.loads(error.body)["error"]
        pump.on_confirm(1, multiple=False, acked=True)
        until(pump, lambda: outlet.acks != [], "the ack")
        assert pump.stats.counts == {Verdict.UNROUTABLE: 1}

    pumping(test)


def test_headers_errors_cannot_carry_are_left_off_and_a_message_nothing_can_carry_is_acked_not_looped():
    def test(pump: Pump, outlet: ScriptedOutlet) -> None:
        outlet.unencodable.add("next")
        pump.on_delivery(Delivery(1, json.dumps(pipeline_message()).encode(), "m-1", None, {"x-unencodable": 1}))
        until(pump, lambda: len(outlet.published) == 1, "the bare error publish")
        [error] = outlet.published
        assert error.routing_key == "errors" and "x-unencodable" not in error.headers
        assert outlet.acks == []

        outlet.unencodable.add("errors")  # now nothing goes out at all
        pump.on_delivery(Delivery(2, json.dumps(pipeline_message()).encode(), "m-2", None, {"x-unencodable": 1}))
        pump.on_confirm(1, multiple=False, acked=True)
        until(pump, lambda: (2, True) in outlet.acks, "the ack of both")
        assert pump.stats.counts == {Verdict.UNROUTABLE: 1, Verdict.DEAD_LETTERED: 1}

    pumping(test)


def test_a_process_still_hung_from_a_lost_connection_ends_the_next_pump_with_process_stuck():
    hang = threading.Event()

    def hangs(msg: Any) -> Any:
        hang.wait(30)
        return msg

    settings: dict[str, Any] = dict(
        worker_id=WORKER_ID, amqp_url="amqp://unused", exchange="pipeline.messages", code_url=None,
        process_timeout_s=0.2,
    )
    code = UserCode(hangs, "usercode", "process", Path("/nonexistent"))
    thread, reactor = UserThread(), Reactor()
    first = Pump(Config(**settings), code, thread, Stats(), reactor)
    first.start(ScriptedOutlet())
    first.on_delivery(delivery(1))
    until(first, lambda: first.handover.current is not None, "the thread to hang on message 1")
    first.on_lost(BrokerLost("connection lost"), expected=False)  # the broker requeues message 1
    first.finish()

    second, outlet = Pump(Config(**settings), code, thread, Stats(), reactor), ScriptedOutlet()
    second.start(outlet)
    second.on_delivery(delivery(2))
    until(second, lambda: second.finished, "the watchdog to see the thread is still hung")
    with pytest.raises(ProcessStuck, match="connection that is gone"):
        second.finish()
    hang.set()
    assert outlet.published == [] and outlet.acks == []  # message 2 goes back with the close
