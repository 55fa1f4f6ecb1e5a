"""The hand-over to the user thread: order, wake-ups, the end of a job, and giving up."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Callable

from dockerworker.amqp import Delivery
from dockerworker.handover import Handover
from dockerworker.processing import Context, Verdict
from dockerworker.userthread import UserThread

from .support import pipeline_message

CTX = Context(worker_id="w-1", queue="worker_w-1", max_attempts=3, max_redeliveries=5)


def delivery(tag: int, **overrides: Any) -> Delivery:
    return Delivery(tag, json.dumps(pipeline_message(**overrides)).encode(), f"m-{tag}", None, {})


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def test_results_come_back_in_delivery_order_and_the_idle_thread_wakes_the_loop():
    async def main() -> None:
        woken: list[int] = []
        handover = Handover(lambda msg: msg, CTX, on_results=lambda: woken.append(1))
        job = UserThread().submit(handover.serve, asyncio.get_running_loop())
        for tag in range(1, 6):
            handover.give(delivery(tag))

        await until(lambda: woken != [], "the wake-up")
        await until(lambda: len(handover._done) == 5, "five results")
        taken = [d.tag for d, outcome, _ in handover.results() if outcome.verdict is Verdict.FORWARDED]
        assert taken == [1, 2, 3, 4, 5]
        assert not handover.has_results
        handover.end(deadline=time.monotonic() + 1)
        await asyncio.wait_for(job, timeout=5)

    asyncio.run(main())


def test_a_job_ends_after_what_was_given_before_the_end():
    async def main() -> None:
        handover = Handover(lambda msg: msg, CTX, on_results=lambda: None)
        job = UserThread().submit(handover.serve, asyncio.get_running_loop())
        handover.give(delivery(1))
        handover.give(delivery(2))
        handover.end(deadline=time.monotonic() + 5)
        handover.give(delivery(3))  # after the end: left to the broker

        await asyncio.wait_for(job, timeout=5)
        await asyncio.sleep(0.01)
        assert [d.tag for d, _, _ in handover.results()] == [1, 2]

    asyncio.run(main())


def test_an_abandoned_job_drops_the_result_of_the_message_it_was_on_and_takes_no_other():
    release = threading.Event()

    def slow(msg: Any) -> Any:
        release.wait(5)
        return msg

    async def main() -> None:
        handover = Handover(slow, CTX, on_results=lambda: None)
        job = UserThread().submit(handover.serve, asyncio.get_running_loop())
        handover.give(delivery(1))
        handover.give(delivery(2))
        await until(lambda: handover.current is not None, "the thread to be on message 1")
        assert handover.current is not None and handover.current[0].tag == 1

        handover.abandon()
        release.set()
        await asyncio.wait_for(job, timeout=5)
        assert not handover.has_results

    asyncio.run(main())
