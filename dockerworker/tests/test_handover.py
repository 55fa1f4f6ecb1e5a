"""The hand-over to the user thread: order, wake-ups, the end of a job, and giving up."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from dockerworker.amqp import Delivery
from dockerworker.handover import Handover
from dockerworker.processing import Context, Verdict
from dockerworker.reactor import Reactor
from dockerworker.userthread import UserThread

from .support import pipeline_message

CTX = Context(worker_id="w-1", queue="worker_w-1", max_attempts=3, max_redeliveries=5)


def delivery(tag: int, **overrides: Any) -> Delivery:
    return Delivery(tag, json.dumps(pipeline_message(**overrides)).encode(), f"m-{tag}", None, {})


def until(reactor: Reactor, condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Run the reactor until `condition` holds; it is checked at least every
    2 ms, since the user thread changes some of what it reads."""
    deadline = time.monotonic() + timeout
    while not reactor.run_until(condition, 0.002):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


class Job:
    """`Handover.serve` on a user thread, and whether it has returned."""

    def __init__(self, handover: Handover, reactor: Reactor) -> None:
        self.reactor = reactor
        self.done = False
        UserThread().submit(handover.serve, done=self._done, reactor=reactor)

    def _done(self, _result: Any, error: BaseException | None) -> None:
        assert error is None, error
        self.done = True

    def wait(self) -> None:
        until(self.reactor, lambda: self.done, "the job to return")


def test_results_come_back_in_delivery_order_and_the_idle_thread_wakes_the_loop():
    reactor = Reactor()
    woken: list[int] = []
    handover = Handover(lambda msg: msg, CTX, reactor, on_results=lambda: woken.append(1))
    job = Job(handover, reactor)
    for tag in range(1, 6):
        handover.give(delivery(tag))

    until(reactor, lambda: woken != [], "the wake-up")
    until(reactor, lambda: len(handover._done) == 5, "five results")
    taken = [d.tag for d, outcome, _ in handover.results() if outcome.verdict is Verdict.FORWARDED]
    assert taken == [1, 2, 3, 4, 5]
    assert not handover.has_results
    handover.end(deadline=time.monotonic() + 1)
    job.wait()


def test_a_job_ends_after_what_was_given_before_the_end():
    reactor = Reactor()
    handover = Handover(lambda msg: msg, CTX, reactor, on_results=lambda: None)
    job = Job(handover, reactor)
    handover.give(delivery(1))
    handover.give(delivery(2))
    handover.end(deadline=time.monotonic() + 5)
    handover.give(delivery(3))  # after the end: left to the broker

    job.wait()
    reactor.run_until(lambda: False, 0.01)
    assert [d.tag for d, _, _ in handover.results()] == [1, 2]


def test_an_abandoned_job_drops_the_result_of_the_message_it_was_on_and_takes_no_other():
    release = threading.Event()

    def slow(msg: Any) -> Any:
        release.wait(5)
        return msg

    reactor = Reactor()
    handover = Handover(slow, CTX, reactor, on_results=lambda: None)
    job = Job(handover, reactor)
    handover.give(delivery(1))
    handover.give(delivery(2))
    until(reactor, lambda: handover.current is not None, "the thread to be on message 1")
    assert handover.current is not None and handover.current[0].tag == 1

    handover.abandon()
    release.set()
    job.wait()
    assert not handover.has_results
